"""Upstream done right: tokens for days, refused tokens, DSQL, cold starts, cuts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from iampg import Endpoint, TokenProvider
from iampg.emulator import Backend, Emulator
from proxy_support import ProxyFactory, error_fields, eventually, query, raw_login
from support import EmulatorFactory, endpoint_for

# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")

# The AWS documentation's second example key pair: a key the emulator does not know.
OTHER_KEY_ID = "AKIAI44QH8DHBEXAMPLE"
OTHER_SECRET = "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY"


def _rejections(emu: Emulator) -> list[str]:
    return [event.reason for event in emu.events if event.outcome == "rejected"]


def test_new_sessions_log_in_after_the_token_expired(
    emulator: Emulator, start_proxy: ProxyFactory
) -> None:
    """Behind a long-running proxy, tokens expire and new sessions still log in."""
    provider = TokenProvider(endpoint_for(emulator), clock=emulator.clock.monotonic)
    proxy = start_proxy(provider.endpoint, provider=provider)
    with psycopg.connect(proxy.conninfo) as first:
        assert first.execute("select 1").fetchone() == (1,)
        for day in range(3):
            emulator.clock.advance(901.0)  # every token signed so far has expired
            with psycopg.connect(proxy.conninfo) as conn:
                assert conn.execute("select %s::int", (day,)).fetchone() == (day,)
        assert first.execute("select 2").fetchone() == (2,)  # sessions outlive their token
    assert _rejections(emulator) == []
    assert provider.stats().refreshes == 4


def test_a_refused_token_is_forgotten_and_retried_once(
    emulator: Emulator, start_proxy: ProxyFactory
) -> None:
    """The server refuses the cached token: the client still logs in, with a new token."""
    provider = TokenProvider(endpoint_for(emulator))  # its own clock: it trusts its token
    proxy = start_proxy(provider.endpoint, provider=provider)
    with psycopg.connect(proxy.conninfo):
        pass
    emulator.clock.advance(901.0)  # the server now sees the cached token as expired
    with psycopg.connect(proxy.conninfo) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert _rejections(emulator) == ["token expired"]
    assert provider.stats().refreshes == 2


def test_an_authentication_failure_is_explained(
    emulator: Emulator, start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys the server does not accept: the server's error, plus iampg's likely causes."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", OTHER_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", OTHER_SECRET)
    proxy = start_proxy(endpoint_for(emulator))
    sock, messages = raw_login(proxy, {"user": "postgres", "database": "postgres"})
    sock.close()
    kind, body = messages[-1]
    assert kind == b"E"
    fields = error_fields(body)
    assert fields["C"] == "28000"
    assert fields["M"] == 'PAM authentication failed for user "postgres"'
    assert "likely causes" in fields["D"]
    assert "rds_iam" in fields["D"]
    assert len(_rejections(emulator)) == 2  # refused, forgotten, retried once, refused
    with pytest.raises(psycopg.OperationalError, match="PAM authentication failed"):
        psycopg.connect(proxy.conninfo)
    assert eventually(lambda: proxy.stats().failed == 2)


@pytest.mark.parametrize("sslmode", ["verify-full", "require"])
def test_dsql_mode(
    start_emulator: EmulatorFactory, start_proxy: ProxyFactory, sslmode: str
) -> None:
    """A DSQL endpoint: DbConnectAdmin token for admin, SNI sent (the emulator requires it).

    SNI goes out whether the certificate's name is checked (verify-full) or not (require).
    """
    emu = start_emulator(service="dsql")
    assert emu.preset.require_sni
    proxy = start_proxy(endpoint_for(emu, user="admin", sslmode=sslmode))
    assert " user=admin dbname=postgres " in proxy.conninfo
    with psycopg.connect(proxy.conninfo) as conn:
        assert conn.execute("select current_user").fetchone() == ("admin",)
    assert [e.outcome for e in emu.events] == ["accepted"]


def test_a_cold_start_waits_while_the_client_waits(
    start_emulator: EmulatorFactory, start_proxy: ProxyFactory
) -> None:
    """A paused Aurora Serverless cluster: the login waits for the resume, then succeeds."""
    emu = start_emulator(preset="aurora-serverless", time_scale=50.0, connect_latency=0.0)
    emu.pause()
    provider = TokenProvider(endpoint_for(emu), clock=emu.clock.monotonic)
    proxy = start_proxy(provider.endpoint, provider=provider, preset="aurora-serverless")
    with psycopg.connect(proxy.conninfo) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    outcomes = [e.outcome for e in emu.events]
    assert outcomes[:3] == ["paused", "resuming", "resumed"]
    assert "accepted" in outcomes


def test_dsql_waking_up_refusals_are_retried(
    start_emulator: EmulatorFactory, start_proxy: ProxyFactory
) -> None:
    """A DSQL cluster refusing with "waking up": the proxy retries until it accepts."""
    emu = start_emulator(service="dsql", time_scale=50.0, resume_delay=10.0)
    emu.pause()
    provider = TokenProvider(endpoint_for(emu, user="admin"), clock=emu.clock.monotonic)
    proxy = start_proxy(provider.endpoint, provider=provider)
    with psycopg.connect(proxy.conninfo) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    reasons = _rejections(emu)
    assert reasons
    assert set(reasons) == {"waking up"}


def test_an_upstream_cut_fails_that_session_only(
    emulator: Emulator, proxy: Any, backend: Backend
) -> None:
    """The server ends one session: its client gets an error, the others work on."""
    with psycopg.connect(proxy.conninfo) as victim, psycopg.connect(proxy.conninfo) as other:
        pid = victim.info.backend_pid
        with psycopg.connect(backend.dsn, autocommit=True) as admin:
            assert admin.execute("select pg_terminate_backend(%s, 5000)", (pid,)).fetchone() == (
                True,
            )
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
        assert other.execute("select 'still here'").fetchone() == ("still here",)
    with psycopg.connect(proxy.conninfo) as conn:
        assert conn.execute("select 3").fetchone() == (3,)


def test_a_client_leaving_mid_query_ends_its_upstream_session(
    emulator: Emulator, proxy: Any, backend: Backend
) -> None:
    """A client that disconnects during a query: the proxy closes its upstream session."""
    sock, messages = raw_login(
        proxy,
        {
            "user": "postgres",
            "database": "postgres",
            "application_name": "leaves-mid-query",
            "options": "-c client_connection_check_interval=100",
        },
    )
    assert messages[-1][0] == b"Z"
    sock.sendall(
        b"Q" + (len(b"select pg_sleep(30)") + 5).to_bytes(4, "big") + b"select pg_sleep(30)\0"
    )
    with psycopg.connect(backend.dsn, autocommit=True) as admin:
        for _ in range(500):
            running = admin.execute(
                "select count(*) from pg_stat_activity where application_name = %s"
                " and state = 'active'",
                ("leaves-mid-query",),
            ).fetchone()
            if running == (1,):
                break
            time.sleep(0.01)
        sock.close()
        for _ in range(1000):
            left = admin.execute(
                "select count(*) from pg_stat_activity where application_name = %s",
                ("leaves-mid-query",),
            ).fetchone()
            if left == (0,):
                break
            time.sleep(0.01)
    assert left == (0,)
    assert proxy.sessions == 0
    assert emulator.session_count == 0
    with psycopg.connect(proxy.conninfo) as conn:
        assert conn.execute("select 4").fetchone() == (4,)


def test_a_raw_session_queries(proxy: Any) -> None:
    """The relay carries a simple query and its rows both ways."""
    sock, messages = raw_login(proxy, {"user": "postgres", "database": "postgres"})
    assert messages[-1][0] == b"Z"
    with sock:
        answer = query(sock, "select 'relay'")
    rows = [body for kind, body in answer if kind == b"D"]
    assert len(rows) == 1
    assert rows[0].endswith(b"relay")


def test_the_upstream_certificate_is_verified(
    emulator: Emulator, start_proxy: ProxyFactory
) -> None:
    """verify-full with iampg's shipped AWS CA set: the emulator's certificate fails, explained."""
    endpoint = endpoint_for(emulator)
    endpoint = Endpoint(endpoint.host, user="postgres", port=endpoint.port, hostaddr="127.0.0.1")
    proxy = start_proxy(endpoint)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.conninfo)
    text = str(info.value)
    assert "did not verify as iampg-emulator" in text
    assert "iampg's RDS CA set" in text
    assert [e.outcome for e in emulator.events] == []  # no token was ever sent


# A CA that signed nothing the emulator presents: any certificate file that is not the
# emulator's CA, e.g. one of iampg's shipped files.
def _other_ca() -> str:
    from iampg import _trust

    return str(_trust.directory() / "amazon-root-ca-1.pem")


@pytest.mark.parametrize("where", ["sslrootcert", "PGSSLROOTCERT", "root.crt"])
def test_require_verifies_the_chain_where_libpq_has_a_root_file(
    emulator: Emulator,
    start_proxy: ProxyFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    where: str,
) -> None:
    """As libpq: sslmode=require with a root file checks the chain; no token to a stranger."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    params: dict[str, Any] = {"sslmode": "require", "sslrootcert": None}
    if where == "sslrootcert":
        params["sslrootcert"] = _other_ca()
    elif where == "PGSSLROOTCERT":
        monkeypatch.setenv("PGSSLROOTCERT", _other_ca())
    else:
        (tmp_path / ".postgresql").mkdir()
        (tmp_path / ".postgresql" / "root.crt").write_bytes(Path(_other_ca()).read_bytes())
    proxy = start_proxy(endpoint_for(emulator, **params))
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        psycopg.connect(proxy.conninfo)
    assert [e.outcome for e in emulator.events] == []  # no token was ever sent


def test_require_with_the_right_root_file_connects(
    emulator: Emulator, start_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The server's own CA in ~/.postgresql/root.crt: require checks the chain, and it holds."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    (tmp_path / ".postgresql").mkdir()
    (tmp_path / ".postgresql" / "root.crt").write_bytes(emulator.ca_file.read_bytes())
    proxy = start_proxy(endpoint_for(emulator, sslmode="require", sslrootcert=None))
    with psycopg.connect(proxy.conninfo) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_require_with_the_system_store_is_refused_as_libpq_refuses_it(
    emulator: Emulator, start_proxy: ProxyFactory
) -> None:
    from iampg import ConfigurationError

    endpoint = endpoint_for(emulator, sslmode="require", sslrootcert="system")
    with pytest.raises(ConfigurationError, match="sslrootcert=system needs sslmode=verify-full"):
        start_proxy(endpoint)
