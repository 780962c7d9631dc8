"""The AWS endpoints the documentation names, emulated on loopback addresses.

The code blocks of README.md and docs/ name real-looking AWS host names and carry no
``hostaddr`` or CA file, as a user's code would. Two emulators answer to those names on port
5432 of addresses that nothing else on the machine listens on, and the environment sends the
documentation's code to them without changing a line of it:

- ``PGHOSTADDR``: libpq dials this address whenever the code gives a host name and no
  ``hostaddr``; TLS and the token still use the name.
- ``IAMPG_SSLROOTCERT``: the CA file iampg verifies servers with instead of its shipped AWS
  trust store (here the emulators' two CA certificates).
- the documented fake AWS keys (set for every test by tests/conftest.py).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from iampg.emulator import DEFAULT_HOSTNAME, Backend, Emulator

# The example endpoints the documentation uses, one per kind of service.
REGION = "us-east-1"
CLUSTER = "my-cluster.cluster-abc123.us-east-1.rds.amazonaws.com"  # Aurora or RDS
PROXY = "my-proxy.proxy-abc123.us-east-1.rds.amazonaws.com"  # RDS Proxy
DSQL = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"  # Aurora DSQL

# Where the emulators listen: the port the host names imply (5432), on loopback addresses
# other than 127.0.0.1, where the machine's own PostgreSQL listens. 127.0.0.2 and 127.0.0.3
# unless another run of these tests holds them (one machine, several worktrees): then the next
# free ones, up to 127.0.0.31.
ADDRESSES = [f"127.0.0.{n}" for n in range(2, 32)]
PORT = 5432

# Database users and databases the documentation logs in as or to.
ROLES = ("app", "postgres")
DATABASES = ("app",)


@dataclass(frozen=True)
class DocsEndpoints:
    """The running emulators and the environment that sends the documentation's code to them.

    Attributes:
        rds: The emulator answering to the RDS, Aurora and RDS Proxy host names.
        dsql: The emulator answering to the DSQL host name.
        backend_dsn: The real PostgreSQL behind both, with an explicit ``hostaddr`` so that
            ``PGHOSTADDR`` does not redirect it.
        environ: The variables to set for every block.
        addresses: The address each service's emulator listens on (``rds``, ``dsql``).
        banner: What the ``export`` lines of ``iampg emulate``'s banner set, for this
            emulator (the tutorial has its reader paste them).
        names: The address each example host name resolves to, for ``docs.use("dns")``.
    """

    rds: Emulator
    dsql: Emulator
    backend_dsn: str
    environ: dict[str, str]
    addresses: dict[str, str]
    banner: dict[str, str]
    names: dict[str, str]


def _pinned_dsn(dsn: str) -> str:
    """Return ``dsn`` with ``hostaddr`` set, so that ``PGHOSTADDR`` cannot redirect it."""
    params = {k: v for k, v in conninfo_to_dict(dsn).items() if v is not None}
    host = str(params.get("host") or "127.0.0.1")
    if "hostaddr" not in params and not host.startswith("/"):
        params["hostaddr"] = socket.gethostbyname(host)
    return make_conninfo("", **params)


def _prepare_backend(backend: Backend) -> None:
    """Create the roles and databases the documentation uses, if missing."""
    for role in ROLES:
        backend.ensure_role(role)
    backend.ensure_role("admin", superuser=True)  # DSQL's administrator role
    with psycopg.connect(backend.dsn, autocommit=True) as conn:
        for name in DATABASES:
            if conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone():
                continue
            conn.execute(
                sql.SQL("create database {} owner {}").format(
                    sql.Identifier(name), sql.Identifier(name)
                )
            )


def _start(make: Callable[[str], Emulator], taken: set[str]) -> Emulator:
    """Start an emulator on the first free address; fail the session if none is free."""
    errors = []
    for address in ADDRESSES:
        if address in taken:
            continue
        emulator = make(address)
        try:
            emulator.start()
        except OSError as exc:
            errors.append(f"{address}: {exc.strerror or exc}")
            continue
        taken.add(address)
        return emulator
    pytest.fail(
        f"the documentation tests need a free loopback address with port {PORT} free for the "
        f"emulator, and found none ({'; '.join(errors[:3])} ...)",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def docs_endpoints(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DocsEndpoints]:
    """Run the emulators for the documentation's example endpoints."""
    _prepare_backend(backend)
    dsn = _pinned_dsn(backend.dsn)
    taken: set[str] = set()
    rds = _start(
        lambda address: Emulator(
            dsn,
            hostnames=[CLUSTER, PROXY, DEFAULT_HOSTNAME],  # the last one: the tutorial's
            region=REGION,
            listen_host=address,
            port=PORT,
        ),
        taken,
    )
    try:
        dsql = _start(
            lambda address: Emulator(
                dsn,
                hostnames=[DSQL],
                region=REGION,
                listen_host=address,
                port=PORT,
                preset="dsql",
            ),
            taken,
        )
        try:
            bundle = tmp_path_factory.mktemp("docs-ca") / "emulators.pem"
            bundle.write_text(rds.ca_file.read_text() + dsql.ca_file.read_text())
            environ = {
                "PGHOSTADDR": rds.listen_host,
                "IAMPG_SSLROOTCERT": str(bundle),
            }
            banner = {
                "PGHOST": DEFAULT_HOSTNAME,
                "PGHOSTADDR": rds.listen_host,
                "PGPORT": str(PORT),
                "PGUSER": "postgres",
                "PGDATABASE": "postgres",
                "PGSSLMODE": "verify-full",
                "PGSSLROOTCERT": str(bundle),
                "AWS_REGION": REGION,
            }
            names = {CLUSTER: rds.listen_host, PROXY: rds.listen_host, DSQL: dsql.listen_host}
            yield DocsEndpoints(
                rds,
                dsql,
                dsn,
                environ,
                {"rds": rds.listen_host, "dsql": dsql.listen_host},
                banner,
                names,
            )
        finally:
            dsql.stop()
    finally:
        rds.stop()


@pytest.fixture
def docs_environ(docs_endpoints: DocsEndpoints, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Set the documentation's environment for one block; return it."""
    for name, value in docs_endpoints.environ.items():
        monkeypatch.setenv(name, value)
    # A page's emulators start their own throwaway PostgreSQL, as a reader's would.
    monkeypatch.delenv("IAMPG_EMULATOR_BACKEND", raising=False)
    return dict(os.environ)


@pytest.fixture(scope="session")
def docs_root() -> Path:
    """Return the repository's root directory."""
    return Path(__file__).resolve().parents[2]
