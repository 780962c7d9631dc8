"""The standard-library signer: byte-identical to botocore, and chosen only when botocore would."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import botocore.auth
import botocore.session
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iampg import Endpoint, TokenError
from iampg._aws import AwsSigner
from iampg._sigv4 import EnvSigner, presign
from iampg.emulator import FAKE_CREDENTIALS
from support import examples

KEY_ID = FAKE_CREDENTIALS.access_key_id
SECRET = FAKE_CREDENTIALS.secret_access_key

_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)
hosts = st.one_of(
    st.lists(_LABEL, min_size=1, max_size=5).map(".".join),
    st.builds(lambda a, b, c, d: f"{a}.{b}.{c}.{d}", *[st.integers(0, 255) for _ in range(4)]),
    st.sampled_from(
        [
            "db.cluster-abc123.us-east-1.rds.amazonaws.com",
            "ep.endpoint.proxy-xyz.eu-west-1.rds.amazonaws.com.cn",
            "localhost",
            "xn--bcher-kva.example",
            "a..b",
            "-x-",
            "UPPER.Case.Example",
        ]
    ),
)
users = st.one_of(
    # no NUL: an Endpoint refuses it (libpq would cut the connection string there)
    st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\0"),
        min_size=1,
        max_size=40,
    ).filter(str.strip),
    st.sampled_from(["admin", "postgres", "Bob", "a b", "x&y=z", "100%", "ünï ✓", "+/?#"]),
)
ports = st.one_of(st.sampled_from([443, 80, 5432, 1, 65535]), st.integers(1, 65535))
regions = st.sampled_from(["us-east-1", "eu-west-1", "ap-southeast-2", "us-gov-west-1"])
# A few fixed ones: botocore clients are made once per session token (~50 ms each).
session_tokens = st.sampled_from(
    [
        None,
        "FwoGZXIvYXdzEXAMPLE",
        "IQoJb3JpZ2luX2VjEXAMPLE+/=" * 40,  # ~1 KB, with the characters that need escaping
    ]
)
# botocore dates signatures with naive UTC datetimes.
moments = st.datetimes(
    min_value=dt.datetime(2000, 1, 1),  # noqa: DTZ001
    max_value=dt.datetime(2099, 12, 31),  # noqa: DTZ001
)
lifetimes = st.integers(1, 604_800)


class Botocore:
    """botocore clients for one set of keys, and a way to freeze their signing time."""

    def __init__(self, session_token: str | None) -> None:
        session = botocore.session.Session()
        session.set_credentials(KEY_ID, SECRET, session_token)
        self.rds = session.create_client("rds", region_name="us-east-1")
        self.dsql = session.create_client("dsql", region_name="us-east-1")

    def dsql_generator(self, user: str) -> Any:
        """botocore's DSQL token function for ``user``: admin signs DbConnectAdmin."""
        if user == "admin":
            return self.dsql.generate_db_connect_admin_auth_token
        return self.dsql.generate_db_connect_auth_token

    @staticmethod
    def frozen(moment: dt.datetime) -> Any:
        # botocore dates a signature with get_current_datetime(), naive UTC; before 1.36 with
        # datetime.datetime.utcnow() in botocore.auth.
        if hasattr(botocore.auth, "get_current_datetime"):
            return mock.patch.object(botocore.auth, "get_current_datetime", return_value=moment)

        class FrozenDatetime(dt.datetime):
            @classmethod
            def utcnow(cls) -> dt.datetime:  # type: ignore[override]
                return moment

        clock = types.SimpleNamespace(datetime=FrozenDatetime)
        return mock.patch.object(botocore.auth, "datetime", clock)


_clients: dict[str | None, Botocore] = {}


def clients(session_token: str | None) -> Botocore:
    """Return (and reuse) botocore clients for the fake keys and this session token."""
    if session_token not in _clients:
        _clients[session_token] = Botocore(session_token)
    return _clients[session_token]


def wall_at(moment: dt.datetime) -> Any:
    """Return a wall clock frozen at a naive UTC ``moment`` plus a sub-second fraction."""
    epoch = moment.replace(tzinfo=dt.timezone.utc).timestamp()
    return lambda: epoch


@pytest.fixture(autouse=True)
def _forget_clients() -> Iterator[None]:
    yield
    _clients.clear()


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    host=hosts,
    user=users,
    port=ports,
    region=regions,
    session_token=session_tokens,
    moment=moments,
)
def test_rds_tokens_are_byte_identical_to_botocore(
    *, host: str, user: str, port: int, region: str, session_token: str | None, moment: dt.datetime
) -> None:
    """An RDS token equals botocore's generate_db_auth_token for any user, host and port."""
    aws_name = host.endswith((".amazonaws.com", ".amazonaws.com.cn"))
    ep = Endpoint(host, user=user, port=port, region=None if aws_name else region)
    signer = EnvSigner(KEY_ID, SECRET, session_token, wall=wall_at(moment))
    boto = clients(session_token)
    with boto.frozen(moment):
        expected = boto.rds.generate_db_auth_token(
            DBHostname=ep.host, Port=ep.port, DBUsername=ep.user, Region=ep.region
        )
    signed = signer.sign(ep, 900.0)
    assert signed.token == expected
    assert signed.lifetime == 900.0
    assert signed.credentials_ttl is None


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cluster=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=20, max_size=40),
    suffix=st.sampled_from(["", "-fips", "-x1"]),
    user=st.one_of(st.just("admin"), users),
    region=regions,
    session_token=session_tokens,
    moment=moments,
    lifetime=lifetimes,
)
def test_dsql_tokens_are_byte_identical_to_botocore(
    *,
    cluster: str,
    suffix: str,
    user: str,
    region: str,
    session_token: str | None,
    moment: dt.datetime,
    lifetime: int,
) -> None:
    """A DSQL token equals botocore's (admin: DbConnectAdmin, others: DbConnect)."""
    ep = Endpoint(f"{cluster}.dsql{suffix}.{region}.on.aws", user=user)
    signer = EnvSigner(KEY_ID, SECRET, session_token, wall=wall_at(moment))
    boto = clients(session_token)
    generate = boto.dsql_generator(user)
    with boto.frozen(moment):
        expected = generate(Hostname=ep.host, Region=ep.region, ExpiresIn=lifetime)
    signed = signer.sign(ep, float(lifetime))
    assert signed.token == expected
    assert signed.lifetime == float(lifetime)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    host=hosts,
    user=st.one_of(st.just("admin"), users),
    port=ports,
    region=regions,
    session_token=session_tokens,
    moment=moments,
    lifetime=lifetimes,
    cluster=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=20, max_size=40),
    dsql=st.booleans(),
)
def test_aws_signer_tokens_are_byte_identical_to_botocore_clients(
    *,
    host: str,
    user: str,
    port: int,
    region: str,
    session_token: str | None,
    moment: dt.datetime,
    lifetime: int,
    cluster: str,
    dsql: bool,
) -> None:
    """AwsSigner signs with botocore.auth and no client: its tokens equal the clients' tokens."""
    signer = AwsSigner.shared(
        aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, aws_session_token=session_token
    )
    boto = clients(session_token)
    if dsql:
        ep = Endpoint(f"{cluster}.dsql.{region}.on.aws", user=user)
        generate = boto.dsql_generator(user)
        with boto.frozen(moment):
            expected = generate(Hostname=ep.host, Region=ep.region, ExpiresIn=lifetime)
            signed = signer.sign(ep, float(lifetime))
    else:
        aws_name = host.endswith((".amazonaws.com", ".amazonaws.com.cn"))
        ep = Endpoint(host, user=user, port=port, region=None if aws_name else region)
        with boto.frozen(moment):
            expected = boto.rds.generate_db_auth_token(
                DBHostname=ep.host, Port=ep.port, DBUsername=ep.user, Region=ep.region
            )
            signed = signer.sign(ep, float(lifetime))
    assert signed.token == expected


@settings(max_examples=examples(200), deadline=None)
@given(
    host=st.from_regex(r"[A-Za-z0-9._-]{1,40}", fullmatch=True),
    action=st.sampled_from(["DbConnect", "DbConnectAdmin"]),
    session_token=session_tokens,
    moment=moments,
    expires=lifetimes,
)
def test_presign_matches_botocore_for_raw_host_names(
    host: str, action: str, session_token: str | None, moment: dt.datetime, expires: int
) -> None:
    """presign() keeps the host's case in the URL and signs it lower-cased, as botocore."""
    boto = clients(session_token)
    with boto.frozen(moment):
        generate = (
            boto.dsql.generate_db_connect_admin_auth_token
            if action == "DbConnectAdmin"
            else boto.dsql.generate_db_connect_auth_token
        )
        expected = generate(Hostname=host, Region="us-east-1", ExpiresIn=expires)
        rds_expected = boto.rds.generate_db_auth_token(
            DBHostname=host, Port=443, DBUsername="u", Region="us-east-1"
        )
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    common: dict[str, Any] = {
        "region": "us-east-1",
        "access_key_id": KEY_ID,
        "secret_access_key": SECRET,
        "session_token": session_token,
        "amz_date": amz_date,
    }
    token = presign(
        host=host,
        port=None,
        service="dsql",
        params=(("Action", action),),
        expires=expires,
        **common,
    )
    assert token == expected
    token = presign(
        host=host,
        port=443,
        service="rds-db",
        params=(("Action", "connect"), ("DBUser", "u")),
        expires=900,
        **common,
    )
    assert token == rds_expected


def test_signing_time_comes_from_the_injected_wall_clock() -> None:
    """The signature is dated by the wall clock given, truncated to the second."""
    moment = dt.datetime(2026, 11, 20, 23, 59, 59, tzinfo=dt.timezone.utc)
    signer = EnvSigner(KEY_ID, SECRET, wall=lambda: moment.timestamp() + 0.999)
    ep = Endpoint("db.example", user="u", region="us-east-1")
    assert "X-Amz-Date=20261120T235959Z" in signer.sign(ep).token


def test_presign_refuses_host_names_it_does_not_handle() -> None:
    """IPv6 literals and URL syntax in a host name are left to botocore."""
    for host in ("::1", "a@b", "a/b", "a?b", "bücher.example"):
        with pytest.raises(ValueError, match="host name"):
            presign(
                host=host,
                port=5432,
                region="us-east-1",
                service="rds-db",
                params=(("Action", "connect"),),
                expires=900,
                access_key_id=KEY_ID,
                secret_access_key=SECRET,
                session_token=None,
                amz_date="20261120T000000Z",
            )


# -- from_environ: only where botocore's default chain would use the same keys -----------


def test_from_environ_needs_both_keys() -> None:
    """No signer without a non-empty access key id and secret (botocore then decides)."""
    assert EnvSigner.from_environ({}) is None
    assert EnvSigner.from_environ({"AWS_ACCESS_KEY_ID": KEY_ID}) is None
    assert (
        EnvSigner.from_environ({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": SECRET}) is None
    )
    assert EnvSigner.from_environ({"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET})


def test_from_environ_takes_the_session_token_botocore_takes() -> None:
    """AWS_SECURITY_TOKEN wins over AWS_SESSION_TOKEN when both are set, as in botocore."""
    env = {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": "session",
        "AWS_SECURITY_TOKEN": "legacy",
    }
    ep = Endpoint("db.example", user="u", region="us-east-1")
    moment = dt.datetime(2026, 1, 2, 3, 4, 5)  # noqa: DTZ001 -- botocore's naive UTC
    signer = EnvSigner.from_environ(env, wall=wall_at(moment))
    assert signer is not None
    with mock.patch.dict("os.environ", env, clear=False):
        session = botocore.session.Session()
        client = session.create_client("rds", region_name="us-east-1")
        with Botocore.frozen(moment):
            expected = client.generate_db_auth_token(
                DBHostname=ep.host, Port=ep.port, DBUsername=ep.user
            )
    assert signer.sign(ep).token == expected
    assert "X-Amz-Security-Token=legacy" in expected
    env["AWS_SECURITY_TOKEN"] = ""
    signer = EnvSigner.from_environ(env)
    assert signer is not None
    assert "X-Amz-Security-Token=session" in signer.sign(ep).token


def test_environment_keys_win_over_aws_profile_in_botocore(tmp_path: Path) -> None:
    """botocore's chain uses the environment keys even when AWS_PROFILE names other keys."""
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[other]\naws_access_key_id = AKIAOTHEREXAMPLE\naws_secret_access_key = other\n"
    )
    env = {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_PROFILE": "other",
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
    }
    with mock.patch.dict("os.environ", env, clear=False):
        resolved = botocore.session.Session().get_credentials()
    assert resolved.access_key == KEY_ID
    assert resolved.method == "env"
    assert EnvSigner.from_environ(env) is not None


def test_credential_expiry_caps_and_then_refuses() -> None:
    """AWS_CREDENTIAL_EXPIRATION is reported as the keys' TTL; past it, signing fails."""
    now = [dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.timezone.utc).timestamp()]
    env = {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": "t",
        "AWS_CREDENTIAL_EXPIRATION": "2026-11-20T12:10:00Z",
    }
    signer = EnvSigner.from_environ(env, wall=lambda: now[0])
    assert signer is not None
    ep = Endpoint("db.example", user="u", region="us-east-1")
    assert signer.sign(ep).credentials_ttl == pytest.approx(600.0)
    now[0] += 601
    with pytest.raises(TokenError, match="expired"):
        signer.sign(ep)
    env["AWS_CREDENTIAL_EXPIRATION"] = "next tuesday"
    assert EnvSigner.from_environ(env) is None
    env["AWS_CREDENTIAL_EXPIRATION"] = "2026-11-20T12:10:00"  # no zone: botocore decides
    assert EnvSigner.from_environ(env) is None


def test_from_environ_declines_host_names_it_does_not_handle() -> None:
    """With an endpoint whose host is an IPv6 literal, botocore keeps the signing."""
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    assert (
        EnvSigner.from_environ(env, endpoint=Endpoint("::1", user="u", region="us-east-1")) is None
    )
    assert EnvSigner.from_environ(env, endpoint=Endpoint("db.x", user="u", region="us-east-1"))


def test_repr_hides_the_secrets() -> None:
    """The repr shows a key prefix only, never the secret or the session token."""
    text = repr(EnvSigner(KEY_ID, SECRET, "sessiontokenvalue"))
    assert SECRET not in text
    assert KEY_ID not in text
    assert "sessiontokenvalue" not in text


def test_signing_imports_no_botocore() -> None:
    """A fresh process signs with the environment keys without importing botocore."""
    code = (
        "import sys, iampg\n"
        "from iampg._sigv4 import EnvSigner\n"
        "s = EnvSigner.from_environ({'AWS_ACCESS_KEY_ID': 'AKIAIOSFODNN7EXAMPLE',"
        " 'AWS_SECRET_ACCESS_KEY': 'x'})\n"
        "ep = iampg.Endpoint('db.example', region='us-east-1', user='u')\n"
        "t = iampg.TokenProvider(ep, signer=s)\n"
        "assert t.token()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('botocore', 'boto3')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
