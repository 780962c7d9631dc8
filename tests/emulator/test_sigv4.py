"""Tests of the emulator's SigV4 token verifier against tokens botocore itself makes."""

from __future__ import annotations

import calendar
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote

import botocore.session
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iampg.emulator import FAKE_CREDENTIALS, Credentials, EmulatorClock
from iampg.emulator import _sigv4 as sigv4
from iampg.emulator._sigv4 import TokenRules, TokenVerificationError, presign, verify_token
from support import examples

if TYPE_CHECKING:
    from collections.abc import Callable

HOST = "mydb.cluster-abc.us-east-1.rds.amazonaws.com"
PORT = 5432
REGION = "us-east-1"
USER = "app_user"
SESSION = Credentials("ASIAEXAMPLEEXAMPLE00", "c2VjcmV0IGtleSBmb3IgdGVzdHM", "FwoG+ZXIvYXdz/EOr=")
RULES = TokenRules.rds(region=REGION, hostnames={HOST}, port=PORT)


# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


class FakeWall:
    """A wall clock that only moves when told to."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def botocore_token(
    creds: Credentials = FAKE_CREDENTIALS,
    *,
    host: str = HOST,
    port: int = PORT,
    user: str = USER,
    region: str = REGION,
) -> str:
    session = botocore.session.get_session()
    session.set_credentials(creds.access_key_id, creds.secret_access_key, creds.session_token)
    client = session.create_client("rds", region_name=region)
    token: str = client.generate_db_auth_token(host, port, user, region)
    return token


def signed_at(token: str) -> float:
    date = dict(parse_qsl(token.partition("?")[2]))["X-Amz-Date"]
    return float(calendar.timegm(time.strptime(date, "%Y%m%dT%H%M%SZ")))


def verify(
    token: str,
    *,
    user: str = USER,
    creds: tuple[Credentials, ...] = (FAKE_CREDENTIALS, SESSION),
    clock: EmulatorClock | None = None,
    rules: TokenRules = RULES,
    action: str = "connect",
) -> sigv4.VerifiedToken:
    return verify_token(
        token,
        rules=rules,
        action=action,
        user=user,
        credentials={c.access_key_id: c for c in creds},
        clock=clock or EmulatorClock(),
    )


def reason_of(token: str, **kwargs: object) -> str:
    with pytest.raises(TokenVerificationError) as info:
        verify(token, **kwargs)  # type: ignore[arg-type]
    return info.value.reason


def replace_param(token: str, name: str, value: str | None) -> str:
    """Return the token with one query parameter replaced (``None`` drops it), unsigned."""
    authority, _, query = token.partition("/?")
    pairs = []
    for pair in query.split("&"):
        key, _, old = pair.partition("=")
        if key == name:
            if value is None:
                continue
            old = quote(value, safe="-_.~")
        pairs.append(f"{key}={old}")
    return f"{authority}/?{'&'.join(pairs)}"


def param(token: str, name: str) -> str:
    return dict(parse_qsl(token.partition("?")[2]))[name]


@pytest.mark.parametrize("creds", [FAKE_CREDENTIALS, SESSION], ids=["long-term", "session"])
def test_presign_matches_botocore_byte_for_byte(creds: Credentials) -> None:
    """The emulator's signer makes exactly botocore's token for the same inputs and second."""
    token = botocore_token(creds, user="pg user+1")
    mine = presign(
        host=HOST,
        port=PORT,
        credentials=creds,
        region=REGION,
        signed_at=signed_at(token),
        user="pg user+1",
    )
    assert mine == token


@pytest.mark.parametrize("creds", [FAKE_CREDENTIALS, SESSION], ids=["long-term", "session"])
def test_botocore_token_is_accepted(creds: Credentials) -> None:
    """A token botocore minted with known keys passes every check."""
    token = botocore_token(creds)
    result = verify(token)
    assert result.access_key_id == creds.access_key_id
    assert result.expires == 900
    assert result.action == "connect"
    assert result.signed_at == signed_at(token)


def test_host_is_case_insensitive_and_reencoding_is_normalised() -> None:
    """Upper-case host names and needlessly percent-encoded characters still verify."""
    token = botocore_token(host=HOST.upper(), user="a-b")
    assert verify(token, user="a-b")
    assert verify(token.replace("DBUser=a-b", "DBUser=a%2Db"), user="a-b")


def test_dsql_tokens_verify_with_dsql_rules() -> None:
    """The verifier is parametrised by service and action: botocore's DSQL tokens pass."""
    session = botocore.session.get_session()
    session.set_credentials(FAKE_CREDENTIALS.access_key_id, FAKE_CREDENTIALS.secret_access_key)
    client = session.create_client("dsql", region_name=REGION)
    host = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"
    rules = TokenRules.dsql(region=REGION, hostnames={host})
    admin = client.generate_db_connect_admin_auth_token(host, REGION, 3600)
    plain = client.generate_db_connect_auth_token(host, REGION)
    assert verify(admin, user="admin", rules=rules, action="DbConnectAdmin").expires == 3600
    assert verify(plain, user="app", rules=rules, action="DbConnect").expires == 900
    assert reason_of(admin, user="app", rules=rules, action="DbConnect") == "wrong action"
    assert reason_of(botocore_token(), rules=rules, action="DbConnect") == "wrong service"


TAMPERS: list[tuple[str, Callable[[str], str], str]] = [
    ("signature", lambda t: t[:-1] + ("0" if t[-1] != "0" else "1"), "signature mismatch"),
    (
        "signature-not-hex",
        lambda t: replace_param(t, "X-Amz-Signature", "z" * 64),
        "signature mismatch",
    ),
    ("signature-missing", lambda t: replace_param(t, "X-Amz-Signature", None), "malformed token"),
    ("user", lambda t: replace_param(t, "DBUser", "someone_else"), "wrong user"),
    ("action", lambda t: replace_param(t, "Action", "DbConnect"), "wrong action"),
    (
        "algorithm",
        lambda t: replace_param(t, "X-Amz-Algorithm", "AWS4-HMAC-SHA512"),
        "wrong algorithm",
    ),
    (
        "signed-headers",
        lambda t: replace_param(t, "X-Amz-SignedHeaders", "host;x-amz-date"),
        "wrong signed headers",
    ),
    (
        "date-one-second",
        lambda t: replace_param(
            t, "X-Amz-Date", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(signed_at(t) - 1))
        ),
        "signature mismatch",
    ),
    (
        "date-garbage",
        lambda t: replace_param(t, "X-Amz-Date", "20241399T256161Z"),
        "malformed token",
    ),
    (
        "scope-date",
        lambda t: replace_param(
            t, "X-Amz-Credential", param(t, "X-Amz-Credential").replace("/2", "/1", 1)
        ),
        "wrong credential scope",
    ),
    (
        "scope-region",
        lambda t: replace_param(
            t, "X-Amz-Credential", param(t, "X-Amz-Credential").replace(REGION, "eu-west-1")
        ),
        "wrong region",
    ),
    (
        "scope-service",
        lambda t: replace_param(
            t, "X-Amz-Credential", param(t, "X-Amz-Credential").replace("rds-db", "rds")
        ),
        "wrong service",
    ),
    (
        "scope-terminator",
        lambda t: replace_param(
            t, "X-Amz-Credential", param(t, "X-Amz-Credential").replace("aws4_request", "aws4")
        ),
        "wrong credential scope",
    ),
    (
        "scope-parts",
        lambda t: replace_param(t, "X-Amz-Credential", "AKIA/20240101"),
        "wrong credential scope",
    ),
    (
        "access-key",
        lambda t: replace_param(
            t, "X-Amz-Credential", param(t, "X-Amz-Credential").replace("AKIA", "AKIB")
        ),
        "unknown access key",
    ),
    ("expires-too-long", lambda t: replace_param(t, "X-Amz-Expires", "901"), "invalid expiry"),
    ("expires-zero", lambda t: replace_param(t, "X-Amz-Expires", "0"), "invalid expiry"),
    ("expires-negative", lambda t: replace_param(t, "X-Amz-Expires", "-5"), "invalid expiry"),
    ("expires-shorter", lambda t: replace_param(t, "X-Amz-Expires", "899"), "signature mismatch"),
    ("host", lambda t: "other" + t, "wrong host"),
    ("port", lambda t: t.replace(f":{PORT}/", ":5433/", 1), "wrong port"),
    ("no-port", lambda t: t.replace(f":{PORT}/", "/", 1), "wrong port"),
    ("extra-param", lambda t: t + "&X-Amz-Extra=1", "signature mismatch"),
    ("duplicate-param", lambda t: t + "&Action=connect", "malformed token"),
    ("no-query", lambda t: t.partition("?")[0], "malformed token"),
    ("scheme", lambda t: "https://" + t, "malformed token"),
    ("empty", lambda t: "", "malformed token"),
    (
        "session-token-added",
        lambda t: t.replace("&X-Amz-Signature", "&X-Amz-Security-Token=abc&X-Amz-Signature"),
        "unexpected session token",
    ),
]


@pytest.mark.parametrize(("tamper", "reason"), [pytest.param(f, r, id=i) for i, f, r in TAMPERS])
def test_tampered_token_is_rejected_with_its_reason(
    tamper: Callable[[str], str], reason: str
) -> None:
    """Changing any one field of a botocore token fails the check that field belongs to."""
    token = botocore_token()
    assert reason_of(tamper(token)) == reason


SESSION_TAMPERS: list[tuple[str, Callable[[str], str], str]] = [
    ("removed", lambda t: replace_param(t, "X-Amz-Security-Token", None), "missing session token"),
    (
        "changed",
        lambda t: replace_param(t, "X-Amz-Security-Token", "FwoG+ZXIvYXdz/EOr=X"),
        "wrong session token",
    ),
]


@pytest.mark.parametrize(
    ("tamper", "reason"), [pytest.param(f, r, id=i) for i, f, r in SESSION_TAMPERS]
)
def test_session_token_must_match_the_key(tamper: Callable[[str], str], reason: str) -> None:
    """Temporary keys need their own session token: missing or different is refused."""
    token = botocore_token(SESSION)
    assert reason_of(tamper(token)) == reason


def test_startup_user_must_match_dbuser() -> None:
    """A token for one user does not log in another."""
    assert reason_of(botocore_token(user="alice"), user="bob") == "wrong user"


def test_expiry_follows_the_clock_with_advance() -> None:
    """A token is good for 900 emulated seconds after X-Amz-Date, then expired."""
    token = botocore_token()
    wall = FakeWall(signed_at(token))
    clock = EmulatorClock(wall=wall)
    clock.advance(900)
    assert verify(token, clock=clock)
    clock.advance(1)
    assert reason_of(token, clock=clock) == "token expired"


def test_expiry_is_time_scaled() -> None:
    """With time_scale=60, 15 real seconds are the token's whole 15 minutes."""
    token = botocore_token()
    wall = FakeWall(signed_at(token))
    clock = EmulatorClock(60.0, wall=wall)
    wall.now += 15.0
    assert clock.token_age(signed_at(token)) == pytest.approx(900.0)
    assert verify(token, clock=clock)
    wall.now += 0.05
    assert reason_of(token, clock=clock) == "token expired"


def test_future_dated_tokens_allow_five_minutes_of_skew() -> None:
    """Tokens dated up to 300 s ahead are accepted (clock skew), further ahead refused."""
    now = float(int(time.time()))
    clock = EmulatorClock(wall=FakeWall(now))

    def token_at(when: float) -> str:
        return presign(
            host=HOST,
            port=PORT,
            credentials=FAKE_CREDENTIALS,
            region=REGION,
            signed_at=when,
            user=USER,
        )

    assert verify(token_at(now + 300), clock=clock)
    assert reason_of(token_at(now + 301), clock=clock) == "token not yet valid"


def test_expired_credentials_invalidate_their_tokens() -> None:
    """Tokens die with the temporary credentials that signed them, even within 15 minutes."""
    now = float(int(time.time()))
    wall = FakeWall(now)
    clock = EmulatorClock(10.0, wall=wall)
    creds = Credentials("ASIATEMPEXAMPLE00000", "secret", "session", expiration=now + 100)
    token = presign(
        host=HOST, port=PORT, credentials=creds, region=REGION, signed_at=now, user=USER
    )
    assert verify(token, creds=(creds,), clock=clock)
    wall.now += 10.0  # 100 emulated seconds
    assert reason_of(token, creds=(creds,), clock=clock) == "credentials expired"


def test_clock_now_scales_and_advances() -> None:
    """now() starts at the creation wall time, runs time_scale times faster, plus advance()."""
    wall = FakeWall(1_000_000.0)
    clock = EmulatorClock(3.0, wall=wall)
    wall.now += 10.0
    assert clock.now() == pytest.approx(1_000_030.0)
    clock.advance(5.0)
    assert clock.now() == pytest.approx(1_000_035.0)
    assert clock.offset == 5.0
    assert clock.time_scale == 3.0
    assert clock.token_age(1_000_000.0) == pytest.approx(35.0)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_clock_rejects_bad_time_scale(scale: float) -> None:
    """A clock must run forward at a finite speed."""
    with pytest.raises(ValueError, match="time_scale"):
        EmulatorClock(scale)


@pytest.mark.parametrize("seconds", [-1.0, float("nan")])
def test_clock_advance_rejects_going_back(seconds: float) -> None:
    """advance() only moves forward."""
    with pytest.raises(ValueError, match="seconds"):
        EmulatorClock().advance(seconds)


def test_credentials_repr_masks_secrets() -> None:
    """Neither the secret key nor the session token appear in repr or str."""
    creds = Credentials("AKIDSENTINEL", "SECRET-SENTINEL", "SESSION-SENTINEL", 5.0)
    for text in (repr(creds), str(creds)):
        assert "SECRET-SENTINEL" not in text
        assert "SESSION-SENTINEL" not in text
        assert "AKIDSENTINEL" in text
    assert "session_token=None" in repr(FAKE_CREDENTIALS)


def test_rejection_never_quotes_the_token() -> None:
    """The exception's text is the short reason only."""
    token = botocore_token()
    with pytest.raises(TokenVerificationError) as info:
        verify(token, user="bob")
    assert str(info.value) == "wrong user"
    assert param(token, "X-Amz-Signature") not in repr(info.value)


@settings(max_examples=examples(200), deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_text_is_only_ever_rejected(text: str) -> None:
    """Garbage never crashes the verifier: it raises TokenVerificationError."""
    with pytest.raises(TokenVerificationError):
        verify(text)


@settings(max_examples=examples(100), deadline=None)
@given(
    user=st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
    position=st.integers(min_value=0),
    char=st.characters(min_codepoint=33, max_codepoint=126),
)
def test_signing_round_trip_and_single_byte_changes(user: str, position: int, char: str) -> None:
    """Any user name round-trips; changing any one character of the token is refused."""
    now = float(int(time.time()))
    token = presign(
        host=HOST, port=PORT, credentials=SESSION, region=REGION, signed_at=now, user=user
    )
    clock = EmulatorClock(wall=FakeWall(now))
    assert verify(token, user=user, clock=clock)
    index = position % len(token)
    tampered = token[:index] + char + token[index + 1 :]
    if tampered.lower() == token.lower() and index < len(HOST):
        return  # the host name is case-insensitive
    try:
        verify(tampered, user=user, clock=clock)
    except TokenVerificationError:
        return
    # The only harmless edits re-spell the same bytes (e.g. a hex digit's case in %2F).
    assert tampered.upper() == token.upper()
