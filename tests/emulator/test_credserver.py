"""Tests of the credentials server: botocore's container provider and STS against the gateway."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import botocore.exceptions
import botocore.session
import psycopg
import pytest

from iampg.emulator import (
    FAKE_CREDENTIALS,
    Backend,
    Credentials,
    CredentialsServer,
    CredentialStore,
    Emulator,
    EmulatorClock,
)
from iampg.errors import ConfigurationError
from support import EmulatorFactory

ROLE = "arn:aws:iam::123456789012:role/app"
PAM = 'PAM authentication failed for user "postgres"'


# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


@pytest.fixture
def emu(start_emulator: EmulatorFactory) -> Emulator:
    """Return a running real-time emulator whose keys live in a shared CredentialStore."""
    return start_emulator(credentials=CredentialStore())


@pytest.fixture
def server(emu: Emulator) -> Iterator[CredentialsServer]:
    """Return a credentials server issuing 120-second keys into the emulator's store."""
    with CredentialsServer.for_emulator(emu, lifetime=120) as srv:
        yield srv


def use_server(monkeypatch: pytest.MonkeyPatch, srv: CredentialsServer) -> None:
    """Point botocore's default chain at the server (static keys would come first)."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    for name, value in srv.env().items():
        monkeypatch.setenv(name, value)


class Token(str):
    """A token that shows as ``<token>`` in reprs, so assertion reports never print it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<token>"


def key_of(token: str) -> str:
    """Return the access key id a token was signed with (never the token itself)."""
    credential = parse_qs(urlsplit("//" + token).query)["X-Amz-Credential"][0]
    return credential.split("/")[0]


def sign(client: Any, emu: Emulator) -> Token:
    return Token(client.generate_db_auth_token(emu.host, emu.port, "postgres", emu.region))


def connects(emu: Emulator, token: str) -> bool:
    """Tell whether the token logs in; a refusal must be RDS's PAM error."""
    error = ""
    try:
        with psycopg.connect(emu.conninfo("postgres", password=token), connect_timeout=5) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError as exc:
        error = str(exc)
    assert PAM in error
    return False


def expiration_of(body: dict[str, Any]) -> float:
    """Return the Expiration of a container-credentials answer, in epoch seconds."""
    text = body["Expiration"]
    assert text.endswith("Z")
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()


def swallow(call: Any, *args: Any) -> None:
    """Run call(*args) in a helper thread, ignoring the error it is expected to raise."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        call(*args)


def fetch(
    srv: CredentialsServer,
    *,
    token: str | None = None,
    method: str = "GET",
    path: str | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, Any]]:
    """Make one raw request to the container endpoint; return status and JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        headers = {"Authorization": srv.env()["AWS_CONTAINER_AUTHORIZATION_TOKEN"]}
        if token is not None:
            headers["Authorization"] = token
        conn.request(method, path or urlsplit(srv.credentials_url).path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else {}
    finally:
        conn.close()


def test_botocore_gets_credentials_that_pass_the_gateway(
    emu: Emulator, server: CredentialsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh botocore session reads the container env, and its tokens are accepted."""
    use_server(monkeypatch, server)
    session = botocore.session.Session()
    assert session.get_credentials().method == "container-role"
    token = sign(session.create_client("rds", region_name=emu.region), emu)
    assert key_of(token).startswith("ASIAEXAMPLE")
    assert connects(emu, token)
    assert emu.events[-1].outcome == "accepted"
    assert server.stats().issued >= 1


def test_expired_credentials_are_refused_and_fresh_ones_work(
    emu: Emulator, server: CredentialsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the keys' expiry their tokens fail ('credentials expired'); new keys work."""
    use_server(monkeypatch, server)
    client = botocore.session.Session().create_client("rds", region_name=emu.region)
    old = sign(client, emu)
    assert connects(emu, old)
    emu.clock.advance(121)
    assert not connects(emu, old)
    assert (emu.events[-1].outcome, emu.events[-1].reason) == ("rejected", "credentials expired")
    new = sign(client, emu)  # botocore refreshes keys that expire within 15 minutes
    assert key_of(new) != key_of(old)
    assert connects(emu, new)


def test_expiration_is_real_time_scaled_and_store_is_emulated(backend: Backend) -> None:
    """The HTTP Expiration is lifetime / time_scale away; the store's is lifetime away."""
    clock = EmulatorClock(time_scale=60)
    with CredentialsServer(clock=clock, lifetime=120) as srv:
        before, before_emulated = time.time(), clock.now()
        status, body = fetch(srv)
        after, after_emulated = time.time(), clock.now()
    assert status == 200
    assert set(body) == {"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}
    real = expiration_of(body)
    assert before + 2 - 1 <= real <= after + 2  # seconds are truncated
    stored = srv.store.lookup(body["AccessKeyId"])
    assert stored is not None
    assert stored.session_token == body["Token"]
    assert stored.expiration is not None
    assert before_emulated + 120 <= stored.expiration <= after_emulated + 120


def test_generated_keys_are_fresh_and_look_like_examples() -> None:
    """Without rotation every request gets a new ASIA...EXAMPLE... key of 20 characters."""
    with CredentialsServer() as srv:
        keys = [fetch(srv)[1]["AccessKeyId"] for _ in range(5)]
    assert len(set(keys)) == 5
    for key in keys:
        assert len(key) == 20
        assert key.startswith("ASIA")
        assert "EXAMPLE" in key
        assert key.isalnum()
        assert key.isupper()
    assert [c.access_key_id for c in srv.issued] == keys


def test_rotation_period_reuses_a_key_until_it_ends() -> None:
    """With rotation=60 the same key is handed out until 60 emulated seconds pass."""
    clock = EmulatorClock()
    with CredentialsServer(clock=clock, lifetime=120, rotation=60) as srv:
        first = fetch(srv)[1]
        second = fetch(srv)[1]
        clock.advance(60)
        third = fetch(srv)[1]
    assert first["AccessKeyId"] == second["AccessKeyId"]
    assert first["Expiration"] == second["Expiration"]
    assert third["AccessKeyId"] != first["AccessKeyId"]
    assert srv.stats().issued == 3


@pytest.mark.parametrize(
    ("token", "path", "status"),
    [
        pytest.param("wrong-token", None, 401, id="wrong-token"),
        pytest.param("", None, 401, id="empty-token"),
        pytest.param(None, "/elsewhere", 404, id="wrong-path"),
    ],
)
def test_bad_requests_are_refused(token: str | None, path: str | None, status: int) -> None:
    """A wrong authorization token or path gets an error and no credentials."""
    with CredentialsServer() as srv:
        got, body = fetch(srv, token=token, path=path)
        stats = srv.stats()
    assert got == status
    assert "AccessKeyId" not in body
    assert (stats.requests, stats.issued, stats.refused) == (1, 0, 1)


def test_error_fault_answers_500_then_recovers() -> None:
    """inject('error', count=2) fails two requests with HTTP 500, then serves again."""
    with CredentialsServer() as srv:
        srv.inject("error", count=2)
        statuses = [fetch(srv)[0] for _ in range(3)]
        stats = srv.stats()
    assert statuses == [500, 500, 200]
    assert (stats.faults, stats.issued) == (2, 1)


def test_expired_fault_hands_out_expired_keys(emu: Emulator, server: CredentialsServer) -> None:
    """inject('expired') issues keys already past expiry in HTTP, store and gateway."""
    server.inject("expired")
    status, body = fetch(server)
    assert status == 200
    assert expiration_of(body) < time.time()
    stored = server.store.lookup(body["AccessKeyId"])
    assert stored is not None
    assert stored.expiration is not None
    assert stored.expiration < emu.clock.now()
    session = botocore.session.Session()
    session.set_credentials(body["AccessKeyId"], body["SecretAccessKey"], body["Token"])
    assert not connects(emu, sign(session.create_client("rds", region_name=emu.region), emu))
    assert emu.events[-1].reason == "credentials expired"
    server.clear_faults()
    assert fetch(server)[0] == 200


def test_hang_fault_is_bounded_and_answers_nothing() -> None:
    """inject('hang') holds the request for hang_seconds, then closes with no answer."""
    with CredentialsServer(hang_seconds=0.3) as srv:
        srv.inject("hang", count=1)
        with pytest.raises(http.client.RemoteDisconnected):
            fetch(srv, timeout=10)
        assert fetch(srv)[0] == 200


def test_stop_ends_hanging_requests_and_joins_threads() -> None:
    """stop() wakes a request hanging for 60 s and returns with no thread left behind."""
    srv = CredentialsServer(hang_seconds=60)
    srv.start()
    srv.inject("hang")
    errors: list[BaseException] = []

    def client() -> None:
        try:
            fetch(srv, timeout=30)
        except (OSError, http.client.HTTPException) as exc:
            errors.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 10
    while srv.stats().faults == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.stats().faults == 1
    srv.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert errors
    assert not [t for t in threading.enumerate() if t.name == "iampg-credentials-server"]
    srv.stop()  # idempotent


def test_connections_over_the_limit_are_refused() -> None:
    """With max_connections=1, a second request while one hangs is closed unanswered."""
    with CredentialsServer(hang_seconds=60, max_connections=1) as srv:
        srv.inject("hang", count=1)
        thread = threading.Thread(target=swallow, args=(fetch, srv))
        thread.start()
        deadline = time.monotonic() + 10
        while srv.stats().faults == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises((OSError, http.client.HTTPException)):
            fetch(srv)
        assert srv.stats().refused == 1
    thread.join(timeout=10)
    assert not thread.is_alive()


def sts_client(srv: CredentialsServer, creds: Credentials = FAKE_CREDENTIALS) -> Any:
    session = botocore.session.Session()
    session.set_credentials(creds.access_key_id, creds.secret_access_key, creds.session_token)
    return session.create_client("sts", region_name="us-east-1", endpoint_url=srv.url)


@pytest.mark.slow
def test_assume_role_issues_scaled_role_credentials_the_gateway_accepts(
    backend: Backend,
) -> None:
    """AssumeRole answers like STS, records the call, and its keys sign accepted tokens."""
    store = CredentialStore()
    with (
        Emulator(backend.dsn, credentials=store, time_scale=60) as emu,
        CredentialsServer(store, clock=emu.clock, external_ids={ROLE: "ext-1"}) as srv,
    ):
        before = time.time()
        answer = sts_client(srv).assume_role(
            RoleArn=ROLE, RoleSessionName="tests", ExternalId="ext-1", DurationSeconds=900
        )
        creds = answer["Credentials"]
        assert answer["AssumedRoleUser"]["Arn"] == (
            "arn:aws:sts::123456789012:assumed-role/app/tests"
        )
        assert answer["AssumedRoleUser"]["AssumedRoleId"].endswith(":tests")
        assert creds["AccessKeyId"].startswith("ASIAEXAMPLE")
        # 900 emulated seconds at 60x are 15 real seconds.
        assert before + 14 <= creds["Expiration"].timestamp() <= time.time() + 15
        stored = store.lookup(creds["AccessKeyId"])
        assert stored is not None
        assert stored.expiration is not None
        assert 899 <= stored.expiration - emu.clock.now() <= 900
        (call,) = srv.assume_role_calls
        assert (call.role_arn, call.role_session_name, call.external_id) == (ROLE, "tests", "ext-1")
        assert (call.duration_seconds, call.source_access_key_id) == (900, "AKIAIOSFODNN7EXAMPLE")
        assert (call.access_key_id, call.error) == (creds["AccessKeyId"], None)
        session = botocore.session.Session()
        session.set_credentials(
            creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"]
        )
        token = sign(session.create_client("rds", region_name=emu.region), emu)
        assert connects(emu, token)
        emu.clock.advance(901)
        assert not connects(emu, token)
        assert emu.events[-1].reason == "credentials expired"


@pytest.mark.parametrize(
    ("creds", "external_id", "code"),
    [
        pytest.param(FAKE_CREDENTIALS, "wrong", "AccessDenied", id="wrong-external-id"),
        pytest.param(FAKE_CREDENTIALS, None, "AccessDenied", id="missing-external-id"),
        pytest.param(
            Credentials("AKIAUNKNOWNEXAMPLE00", "secret"),
            "ext-1",
            "InvalidClientTokenId",
            id="unknown-key",
        ),
        pytest.param(
            Credentials(FAKE_CREDENTIALS.access_key_id, "not-the-secret"),
            "ext-1",
            "SignatureDoesNotMatch",
            id="wrong-secret",
        ),
    ],
)
def test_assume_role_refusals(creds: Credentials, external_id: str | None, code: str) -> None:
    """Unknown keys, bad signatures and external id mismatches get STS's error codes."""
    with CredentialsServer(external_ids={ROLE: "ext-1"}) as srv:
        extra = {} if external_id is None else {"ExternalId": external_id}
        with pytest.raises(botocore.exceptions.ClientError) as info:
            sts_client(srv, creds).assume_role(RoleArn=ROLE, RoleSessionName="tests", **extra)
        assert info.value.response["Error"]["Code"] == code
        (call,) = srv.assume_role_calls
        assert (call.error, call.access_key_id) == (code, None)
        assert call.source_access_key_id == creds.access_key_id
        assert srv.stats().issued == 0


def test_assume_role_validates_duration() -> None:
    """DurationSeconds outside 900..43200 is a ValidationError, as on STS."""
    with CredentialsServer() as srv:
        client = sts_client(srv)
        with pytest.raises(botocore.exceptions.ClientError) as info:
            client.assume_role(RoleArn=ROLE, RoleSessionName="tests", DurationSeconds=50_000)
    assert info.value.response["Error"]["Code"] == "ValidationError"


def test_emulator_accepts_any_lookup_object(backend: Backend) -> None:
    """Emulator(credentials=obj) asks obj.lookup() for each token's key."""

    class Lookup:
        def __init__(self) -> None:
            self.asked: list[str] = []

        def lookup(self, access_key_id: str) -> Credentials | None:
            self.asked.append(access_key_id)
            return FAKE_CREDENTIALS if access_key_id == FAKE_CREDENTIALS.access_key_id else None

    lookup = Lookup()
    with Emulator(backend.dsn, credentials=lookup) as emu:
        assert emu.credential_store is lookup
        assert emu.credentials == FAKE_CREDENTIALS
        session = botocore.session.Session()
        session.set_credentials(FAKE_CREDENTIALS.access_key_id, FAKE_CREDENTIALS.secret_access_key)
        assert connects(emu, sign(session.create_client("rds", region_name=emu.region), emu))
    assert lookup.asked == [FAKE_CREDENTIALS.access_key_id]


def test_store_rejects_duplicates_and_forgets_removed_keys() -> None:
    """A store refuses a key given twice; remove() revokes a key."""
    with pytest.raises(ValueError, match="given twice"):
        CredentialStore([FAKE_CREDENTIALS, FAKE_CREDENTIALS])
    store = CredentialStore()
    assert store.default == FAKE_CREDENTIALS
    assert FAKE_CREDENTIALS.access_key_id in store
    store.remove(FAKE_CREDENTIALS.access_key_id)
    assert store.lookup(FAKE_CREDENTIALS.access_key_id) is None
    assert len(store) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lifetime": 0}, "lifetime"),
        ({"lifetime": float("nan")}, "lifetime"),
        ({"lifetime": 60, "rotation": 120}, "rotation"),
        ({"rotation": 0}, "rotation"),
        ({"path": "no-slash"}, "path"),
        ({"auth_token": "a\nb"}, "auth_token"),
        ({"hang_seconds": 1000}, "hang_seconds"),
        ({"max_connections": 0}, "max_connections"),
        ({"port": 70000}, "port"),
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any], match: str) -> None:
    """Invalid options raise ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match=match):
        CredentialsServer(**kwargs)


def test_for_emulator_needs_a_credential_store(backend: Backend) -> None:
    """for_emulator() refuses an emulator whose lookup object cannot take new keys."""

    class Lookup:
        def lookup(self, access_key_id: str) -> Credentials | None:
            return None

    emu = Emulator(backend.dsn, credentials=Lookup())
    with pytest.raises(ConfigurationError, match="CredentialStore"):
        CredentialsServer.for_emulator(emu)


def test_secrets_stay_out_of_reprs_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Secret keys, session tokens and the authorization token appear in no log or repr."""
    caplog.set_level(logging.DEBUG, logger="iampg")
    with CredentialsServer() as srv:
        auth = srv.env()["AWS_CONTAINER_AUTHORIZATION_TOKEN"]
        body = fetch(srv)[1]
        fetch(srv, token="wrong")
        sts_client(srv).assume_role(RoleArn=ROLE, RoleSessionName="tests")
        text = caplog.text + repr(srv) + repr(srv.issued) + repr(srv.assume_role_calls)
    assert body["AccessKeyId"] in caplog.text  # the key id is logged, so the check can fail
    for secret in [auth, body["SecretAccessKey"], body["Token"]]:
        assert secret not in text
    for creds in srv.issued:
        assert creds.secret_access_key not in text
        assert creds.session_token is not None
        assert creds.session_token not in text
