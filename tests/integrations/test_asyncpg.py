"""asyncpg through the emulator: per-connection tokens and verify-full TLS towards hostaddr."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import asyncpg
import pytest

from iampg import TokenProvider
from iampg.emulator import Emulator
from iampg.errors import ConfigurationError
from iampg.integrations import asyncpg as iampg_asyncpg
from support import endpoint_for, open_sockets


async def _until_sockets_closed(emu: Emulator) -> None:
    """Keep the loop running until no connection of ours to ``emu`` is left open.

    asyncpg closes a refused connection's TLS politely and raises before the close has
    finished; ending the loop right then would leave the socket for the garbage collector.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while open_sockets(emu.port, side="peer"):
        assert loop.time() < deadline, "a connection to the emulator did not close"
        await asyncio.sleep(0.01)


def test_connect_kwargs_dial_the_address_and_verify_the_signed_name(emulator: Emulator) -> None:
    """Keyword arguments dial hostaddr, pin TLS to the signed host and pass atoken itself."""
    provider = TokenProvider(endpoint_for(emulator, application_name="app", options="-c x.y=1"))
    kwargs = iampg_asyncpg.connect_kwargs(provider)
    assert kwargs["host"] == emulator.listen_host
    assert kwargs["password"] == provider.atoken
    context = kwargs["ssl"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert kwargs["timeout"] == 5.0
    assert kwargs["server_settings"] == {"application_name": "app", "x.y": "1"}


def test_plain_asyncpg_connect_with_the_kwargs(emulator: Emulator) -> None:
    """asyncpg.connect(**connect_kwargs(...)) authenticates over verify-full TLS."""
    provider = TokenProvider(endpoint_for(emulator), clock=emulator.clock.monotonic)

    async def main() -> tuple[Any, ...]:
        conn = await asyncpg.connect(**iampg_asyncpg.connect_kwargs(provider))
        try:
            row = await conn.fetchrow("select current_user, 1")
        finally:
            await conn.close()
        assert row is not None
        return tuple(row)

    assert asyncio.run(main()) == ("postgres", 1)


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [False, True], ids=["fresh-token", "frozen-token"])
def test_pool_across_token_expiry(emulator: Emulator, frozen: bool) -> None:
    """A new pooled connection after the token expired works; a frozen password fails."""
    provider = TokenProvider(endpoint_for(emulator), clock=emulator.clock.monotonic)

    async def run() -> tuple[int, int]:
        if frozen:
            kwargs = {**iampg_asyncpg.connect_kwargs(provider), "password": provider.token()}
            pool = asyncpg.create_pool(min_size=1, max_size=1, **kwargs)
        else:
            pool = iampg_asyncpg.create_pool(provider, min_size=1, max_size=1)
        async with pool:
            first: int = await pool.fetchval("select pg_backend_pid()")
            await asyncio.to_thread(emulator.clock.advance, 901.0)
            await pool.expire_connections()  # the next acquire opens a new connection
            second: int = await pool.fetchval("select pg_backend_pid()")
        return first, second

    async def main() -> tuple[int, int]:
        try:
            return await run()
        finally:
            await _until_sockets_closed(emulator)

    if frozen:
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="PAM"):
            asyncio.run(main())
    else:
        first, second = asyncio.run(main())
        assert first != second
        assert provider.stats().refreshes == 2


@pytest.mark.slow
def test_refused_token_is_forgotten(emulator: Emulator) -> None:
    """connect() drops a token the server refused, so the next attempt signs a new one."""
    provider = TokenProvider(endpoint_for(emulator))  # its clock does not move: skewed
    provider.token()
    emulator.clock.advance(901.0)

    async def main() -> str:
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await iampg_asyncpg.connect(provider)
        await _until_sockets_closed(emulator)
        conn = await iampg_asyncpg.connect(provider)
        try:
            user: str = await conn.fetchval("select current_user")
        finally:
            await conn.close()
        return user

    assert asyncio.run(main()) == "postgres"


def test_verify_full_refuses_an_unknown_ca(emulator: Emulator, tmp_path: Any) -> None:
    """Control: verification is real; a CA that did not sign the server certificate fails."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    other = tmp_path / "other-ca.pem"
    other.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    provider = TokenProvider(endpoint_for(emulator, sslrootcert=str(other)))

    async def main() -> None:
        conn = await iampg_asyncpg.connect(provider)
        await conn.close()

    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(main())


def test_verify_full_checks_the_signed_host_name(emulator: Emulator) -> None:
    """Control: with hostaddr dialled, a host name the certificate lacks is refused."""
    ep = endpoint_for(emulator)
    provider = TokenProvider(ep)
    kwargs = iampg_asyncpg.connect_kwargs(provider)
    kwargs["ssl"].server_name = "not-this-host.example.com"

    async def main() -> None:
        conn = await asyncpg.connect(**kwargs)
        await conn.close()

    with pytest.raises(ssl.SSLCertVerificationError, match="not-this-host"):
        asyncio.run(main())


def test_unsupported_libpq_parameters_are_refused(emulator: Emulator) -> None:
    """A libpq parameter asyncpg cannot honour is a configuration error, not ignored."""
    with pytest.raises(ConfigurationError, match="keepalives"):
        iampg_asyncpg.connect_kwargs(endpoint_for(emulator, keepalives="1"))


def test_connect_reuses_its_tls_context_until_the_ca_file_changes(
    emulator: Emulator, tmp_path: Any
) -> None:
    """connect() keeps one TLS context per settings, and reads a replaced CA file again."""
    import shutil

    from iampg._connecting import connect_params

    ca = tmp_path / "ca.pem"
    shutil.copy(emulator.ca_file, ca)
    ep = endpoint_for(emulator, sslrootcert=str(ca))
    params = connect_params(ep)
    first = iampg_asyncpg._arguments(ep, params, shared=True)["ssl"]
    assert iampg_asyncpg._arguments(ep, params, shared=True)["ssl"] is first
    assert iampg_asyncpg._arguments(ep, params)["ssl"] is not first  # connect_kwargs: its own
    ca.write_bytes(ca.read_bytes() + b"\n")  # a new bundle in place of the old one
    assert iampg_asyncpg._arguments(ep, params, shared=True)["ssl"] is not first
