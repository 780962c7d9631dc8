"""The local side as a newcomer meets it: its connection string, TLS on loopback, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from iampg import Endpoint
from iampg.proxy import Proxy
from proxy_support import ProxyFactory
from secret_guard import SENTINEL_PASSWORD

# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")

# What pasting ``iampg emulate``'s banner leaves in a shell: libpq would dial this address
# (nothing listens there) and demand a certificate verified against this file.
HOSTILE_ENVIRONMENT = {
    "PGHOSTADDR": "127.0.0.254",
    "PGSSLMODE": "verify-full",
    "PGSSLROOTCERT": "/nonexistent/iampg-test-ca.pem",
    "PGHOST": "iampg-test-host.invalid",
    "PGPORT": "1",
}


def _psql_in_hostile_shell(conninfo: str, password: str | None = None, **extra: str) -> str:
    """Run psql with ``conninfo`` alone, in a shell with the banner's exports; its output."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    env = {**os.environ, **HOSTILE_ENVIRONMENT, **extra}
    env.pop("PGPASSWORD", None)
    if password is not None:
        env["PGPASSWORD"] = password
    env = {name: value for name, value in env.items() if value}
    done = subprocess.run(
        [psql, conninfo, "-X", "-c", "\\conninfo", "-Atc", "select 'through the proxy'"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_conninfo_without_client_tls_resists_the_environment(proxy: Proxy) -> None:
    """``hostaddr`` and ``sslmode=disable`` follow the documented prefix; PG* cannot redirect."""
    assert proxy.conninfo == (
        f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres "
        "hostaddr=127.0.0.1 sslmode=disable"
    )
    out = _psql_in_hostile_shell(proxy.conninfo)
    assert "through the proxy" in out
    assert "SSL connection" not in out


def test_conninfo_with_a_generated_certificate_verifies_it(
    emulator_endpoint: Endpoint, start_proxy: ProxyFactory
) -> None:
    """With a generated certificate the string verifies it with its CA, whatever PG* say."""
    proxy = start_proxy(emulator_endpoint, client_tls="generate", password=SENTINEL_PASSWORD)
    assert proxy.conninfo.startswith(f"host=127.0.0.1 port={proxy.port} user=postgres ")
    assert proxy.conninfo.endswith(
        f" hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={proxy.ca_file}"
    )
    out = _psql_in_hostile_shell(proxy.conninfo, SENTINEL_PASSWORD, PGSSLMODE="disable")
    assert "through the proxy" in out
    assert "SSL connection" in out


def test_conninfo_with_a_given_certificate_requires_tls(
    emulator_endpoint: Endpoint, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """With a given certificate (whose CA the proxy does not know): ``sslmode=require``."""
    from iampg.emulator._tls import make_certificates

    files = make_certificates(["localhost"], tmp_path, loopback=True)
    proxy = start_proxy(
        emulator_endpoint,
        client_tls=(files.cert_file, files.key_file),
        password=SENTINEL_PASSWORD,
    )
    assert proxy.conninfo.endswith(" hostaddr=127.0.0.1 sslmode=require")
    out = _psql_in_hostile_shell(
        proxy.conninfo, SENTINEL_PASSWORD, PGSSLMODE="disable", PGSSLROOTCERT=""
    )
    assert "through the proxy" in out
    assert "SSL connection" in out


def test_client_tls_applies_to_loopback_tcp_clients_not_to_the_unix_socket(
    emulator_endpoint: Endpoint, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """With client TLS, a loopback TCP client without TLS is refused; the Unix socket is not."""
    proxy = start_proxy(
        emulator_endpoint,
        client_tls="generate",
        password=SENTINEL_PASSWORD,
        unix_socket_dir=tmp_path,
    )
    with pytest.raises(psycopg.OperationalError, match="requires TLS on TCP connections"):
        psycopg.connect(proxy.conninfo, password=SENTINEL_PASSWORD, sslmode="disable")
    local = f"host={tmp_path} port={proxy.port} user=postgres dbname=postgres sslmode=disable"
    with psycopg.connect(local, password=SENTINEL_PASSWORD) as conn:
        assert conn.execute("select 'unix'").fetchone() == ("unix",)
        assert not conn.info.pgconn.ssl_in_use
    assert proxy.stats().failed == 1


def test_the_generated_certificate_names_the_proxy(
    emulator_endpoint: Endpoint, start_proxy: ProxyFactory
) -> None:
    """Its subject and issuer say "iampg proxy", not the emulator."""
    proxy = start_proxy(emulator_endpoint, client_tls="generate", password=SENTINEL_PASSWORD)
    assert proxy.ca_file is not None
    context = ssl.create_default_context(cafile=str(proxy.ca_file))
    context.set_alpn_protocols(["postgresql"])
    with (
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,  # direct TLS
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    ca = x509.load_pem_x509_certificate(proxy.ca_file.read_bytes())
    for name in (cert.subject, cert.issuer, ca.subject):
        organization = name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        assert [a.value for a in organization] == ["iampg proxy"]
    common = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in common] == ["iampg proxy CA"]


def _stopping_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("proxy stopping")]


def test_stopping_counts_sessions_after_closes_in_flight(
    emulator_endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """A session closed just before stop is not counted; one open session is "1 session"."""
    caplog.set_level(logging.INFO, logger="iampg.proxy")

    async def closed_just_before() -> None:
        proxy = Proxy(emulator_endpoint, grace=60.0)
        await proxy.astart()
        try:
            conn = await psycopg.AsyncConnection.connect(proxy.conninfo)
            await conn.close()
        finally:
            await proxy.astop()

    asyncio.run(closed_just_before())
    assert _stopping_lines(caplog) == []

    ports: list[int] = []

    async def one_open() -> None:
        proxy = Proxy(emulator_endpoint, grace=60.0)
        await proxy.astart()
        ports.append(proxy.port)
        conn = await psycopg.AsyncConnection.connect(proxy.conninfo)
        try:
            stopping = asyncio.ensure_future(proxy.astop())
            for _ in range(1000):  # until it has said how many sessions remain
                if _stopping_lines(caplog):
                    break
                await asyncio.sleep(0.01)
        finally:
            await conn.close()
        await stopping

    asyncio.run(one_open())
    assert _stopping_lines(caplog) == [
        f"proxy stopping on port {ports[0]}: 1 session may finish within 60 s"
    ]
