"""Clients of every kind log in through the proxy without knowing about IAM."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess

import psycopg
import pytest

from iampg import Endpoint
from iampg.proxy import Proxy
from proxy_support import PROTOCOL_3_2, error_fields, eventually, query, raw_login
from support import node_with

# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


def test_conninfo_names_the_local_side_without_password(proxy: Proxy) -> None:
    """The connection string is host, port, user and dbname of the local side, no password."""
    assert proxy.conninfo.startswith(
        f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres "
    )
    assert "password" not in proxy.conninfo
    assert proxy.port > 0
    assert proxy.host == "127.0.0.1"


def test_psycopg(proxy: Proxy) -> None:
    """psycopg logs in with the conninfo alone and queries."""
    with psycopg.connect(proxy.conninfo) as conn:
        assert conn.execute("select 41 + 1").fetchone() == (42,)


def test_psycopg2(proxy: Proxy) -> None:
    """psycopg2 logs in with the conninfo alone and queries."""
    psycopg2 = pytest.importorskip("psycopg2")
    conn = psycopg2.connect(proxy.conninfo)
    try:
        with conn.cursor() as cur:
            cur.execute("select 'psycopg2'")
            assert cur.fetchone() == ("psycopg2",)
    finally:
        conn.close()


def test_asyncpg(proxy: Proxy) -> None:
    """asyncpg logs in (no password, no TLS) and queries."""
    asyncpg = pytest.importorskip("asyncpg")

    async def run() -> object:
        conn = await asyncpg.connect(
            host=proxy.host, port=proxy.port, user="postgres", database="postgres", ssl=False
        )
        try:
            return await conn.fetchval("select 'asyncpg'")
        finally:
            await conn.close()

    assert asyncio.run(run()) == "asyncpg"


def test_pg8000(proxy: Proxy) -> None:
    """pg8000 (pure Python, its own protocol code) logs in and queries."""
    pg8000 = pytest.importorskip("pg8000.native")
    conn = pg8000.Connection("postgres", host=proxy.host, port=proxy.port, database="postgres")
    try:
        assert conn.run("select 'pg8000'") == [["pg8000"]]
    finally:
        conn.close()


def test_psql(proxy: Proxy) -> None:
    """psql logs in with the conninfo and runs a command."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    result = subprocess.run(
        [psql, proxy.conninfo, "-XAtc", "select 'psql'"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "psql"


def test_psql_through_the_unix_socket(emulator_endpoint_proxy: Proxy) -> None:
    """psql -h DIR -p PORT reaches the proxy's Unix socket."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    proxy = emulator_endpoint_proxy
    assert proxy.unix_socket is not None
    result = subprocess.run(
        [
            psql,
            "-h",
            str(proxy.unix_socket.parent),
            "-p",
            str(proxy.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-XAtc",
            "select 'unix'",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "unix"


_NODE_SCRIPT = """
const { Client } = require('pg');
const client = new Client({ host: process.argv[1], port: Number(process.argv[2]),
                            user: 'postgres', database: 'postgres' });
client.connect()
  .then(() => client.query("select 'node-postgres' as v"))
  .then((res) => { console.log(res.rows[0].v); return client.end(); })
  .catch((err) => { console.error(err.message); process.exit(1); });
"""


def test_node_postgres(proxy: Proxy) -> None:
    """node-postgres (pure JavaScript) logs in and queries."""
    found = node_with("pg")
    if found is None:
        pytest.skip("node or its pg package is not installed (npm ci --prefix tests/node)")
    node, env = found
    result = subprocess.run(
        [node, "-e", _NODE_SCRIPT, proxy.host, str(proxy.port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "node-postgres"


def test_startup_parameters_reach_the_server(proxy: Proxy) -> None:
    """application_name, options and client_encoding the client sends are the server's."""
    with psycopg.connect(
        proxy.conninfo,
        application_name="through-proxy",
        options="-c statement_timeout=4321 -c search_path=public",
        client_encoding="LATIN1",
    ) as conn:
        row = conn.execute(
            "select current_setting('application_name'), current_setting('statement_timeout'),"
            " current_setting('search_path'), current_setting('client_encoding')"
        ).fetchone()
    assert row == ("through-proxy", "4321ms", "public", "LATIN1")


def test_protocol_3_2_is_negotiated_with_the_server(proxy: Proxy) -> None:
    """A 3.2 startup reaches the server; its answer (NegotiateProtocolVersion or not) comes back.

    The cancel key the client gets has the length of the server's for the protocol agreed.
    """
    sock, messages = raw_login(proxy, {"user": "postgres", "database": "postgres"}, PROTOCOL_3_2)
    with sock:
        kinds = [kind for kind, _ in messages]
        assert kinds[-1] == b"Z", messages
        negotiated = [body for kind, body in messages if kind == b"v"]
        keys = [body for kind, body in messages if kind == b"K"]
        assert len(keys) == 1
        if negotiated:  # the server speaks 3.0: it said so, and keys are 4 bytes
            assert int.from_bytes(negotiated[0][:4], "big") == 3 << 16
            assert len(keys[0]) == 8
        else:
            assert len(keys[0]) >= 8
        assert query(sock, "select 1")[-1][0] == b"Z"


def test_replication_connections_are_refused(proxy: Proxy) -> None:
    """A replication connection gets a clear error, and no session."""
    sock, messages = raw_login(
        proxy, {"user": "postgres", "database": "postgres", "replication": "database"}
    )
    sock.close()
    kind, body = messages[-1]
    assert kind == b"E"
    fields = error_fields(body)
    assert fields["C"] == "0A000"
    assert "replication connections are not supported" in fields["M"]
    assert proxy.stats().opened == 0


def test_another_user_is_refused(proxy: Proxy) -> None:
    """The proxy logs in as its endpoint's user only; another user gets a clear error."""
    with pytest.raises(psycopg.OperationalError, match='logs in as user "postgres" only'):
        psycopg.connect(proxy.conninfo.replace("user=postgres", "user=someone"))


def test_server_errors_reach_the_client_unchanged(proxy: Proxy) -> None:
    """A database that does not exist: the server's own FATAL error, SQLSTATE included."""
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.conninfo.replace("dbname=postgres", "dbname=no_such_db"))
    assert 'database "no_such_db" does not exist' in str(info.value)
    sock, messages = raw_login(proxy, {"user": "postgres", "database": "no_such_db"})
    sock.close()
    kind, body = messages[-1]
    assert kind == b"E"
    fields = error_fields(body)
    assert (fields["S"], fields["C"]) == ("FATAL", "3D000")
    assert "D" not in fields  # nothing added: not an authentication failure
    with psycopg.connect(proxy.conninfo) as conn, pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("select 1/0")


def test_async_context_manager(emulator_endpoint: Endpoint) -> None:
    """``async with Proxy(...)`` runs it on the running loop."""

    async def run() -> tuple[object, int]:
        async with Proxy(emulator_endpoint, grace=0) as proxy:
            conn = await psycopg.AsyncConnection.connect(proxy.conninfo)
            async with conn:
                row = await (await conn.execute("select 'async'")).fetchone()
                sessions = proxy.sessions
        return row, sessions

    assert asyncio.run(run()) == (("async",), 1)


def test_stats_and_open_sessions(proxy: Proxy) -> None:
    """The proxy reports its sessions, their bytes, and the counts since it started."""
    with psycopg.connect(proxy.conninfo) as conn:
        conn.execute("select 1")
        assert proxy.sessions == 1
        (info,) = proxy.open_sessions()
        assert (info.user, info.database) == ("postgres", "postgres")
        assert info.client.startswith("127.0.0.1:")
        assert info.bytes_from_client > 0
        assert info.bytes_to_client > 0
    assert eventually(lambda: proxy.stats().closed == 1)
    stats = proxy.stats()
    assert (stats.opened, stats.closed, stats.failed, stats.active) == (1, 1, 0, 0)
    assert stats.bytes_from_clients > 0
    assert stats.bytes_to_clients > 0


def test_bytes_are_counted_once_while_open_and_after_close(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A session's bytes count in the totals while it relays and after it ends, not twice."""
    caplog.set_level(logging.INFO, logger="iampg.proxy")
    with psycopg.connect(proxy.conninfo) as conn:
        conn.execute("select repeat('x', 100000)").fetchone()
        (live,) = proxy.open_sessions()
        during = proxy.stats()
        assert live.bytes_to_client > 100_000
        assert (during.bytes_from_clients, during.bytes_to_clients) == (
            live.bytes_from_client,
            live.bytes_to_client,
        )
    assert eventually(lambda: proxy.stats().closed == 1)
    after = proxy.stats()
    assert after.bytes_to_clients >= during.bytes_to_clients
    assert after.bytes_to_clients < 2 * during.bytes_to_clients

    def closed_lines() -> list[str]:
        return [m for r in list(caplog.records) if (m := r.getMessage()).startswith("session c")]

    assert eventually(lambda: len(closed_lines()) == 1)
    (line,) = closed_lines()
    assert f"bytes_from_client={after.bytes_from_clients} " in line
    assert f"bytes_to_client={after.bytes_to_clients} " in line


def test_client_given_names_cannot_forge_log_lines(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A user or database name with a line break is quoted in the text log line."""
    forged = "x\nsession closed client=1.2.3.4:5 user=admin"
    sock, messages = raw_login(proxy, {"user": "postgres", "database": forged})
    sock.close()
    assert messages[-1][0] == b"E"  # no such database
    assert eventually(lambda: proxy.stats().failed == 1)

    def closed_lines() -> list[str]:
        records = list(caplog.records)  # the proxy's thread may be logging its line now
        return [m for r in records if (m := r.getMessage()).startswith("session closed")]

    assert eventually(lambda: len(closed_lines()) == 1)
    lines = closed_lines()
    assert "\n" not in lines[0]
    assert repr(forged) in lines[0]
