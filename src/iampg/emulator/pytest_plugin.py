"""pytest plugin: an iampg emulator per test session, its endpoint, CA file, clock and AWS env.

Installed with ``iampg[emulator]`` and loaded by pytest automatically (entry point
``pytest11: iampg``); disable it with ``-p no:iampg``. Importing it is cheap: nothing starts
until a test asks for a fixture.

Fixtures:

- ``iampg_backend`` (session): the real PostgreSQL behind the emulator.
- ``iampg_emulator`` (session): a running :class:`iampg.emulator.Emulator`.
- ``iampg_endpoint`` (session): an :class:`iampg.Endpoint` for it.
- ``iampg_ca_file`` (session): the CA certificate to verify it with.
- ``iampg_clock`` (session): its :class:`iampg.emulator.EmulatorClock`.
- ``iampg_aws_env``: botocore's environment with the documented fake keys, nothing else.
- ``iampg_credentials_server``: a :class:`iampg.emulator.CredentialsServer` botocore fetches
  rotating temporary keys from.

Settings (``[tool.pytest.ini_options]`` or ``pytest.ini``):

- ``iampg_profile``: the emulator's profile (``rds``, ``aurora-express``, ``dsql``...).
- ``iampg_time_scale``: emulated seconds per real second (default 1).
- ``iampg_user``: the database user of ``iampg_endpoint`` (default: the backend's user; for
  DSQL, ``admin``).
- ``iampg_credentials_lifetime``: emulated seconds the credentials server's keys live
  (default 3600).
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from iampg import Endpoint
    from iampg.emulator import Backend, CredentialsServer, Emulator, EmulatorClock

__all__ = [
    "iampg_aws_env",
    "iampg_backend",
    "iampg_ca_file",
    "iampg_clock",
    "iampg_credentials_server",
    "iampg_emulator",
    "iampg_endpoint",
]

_BACKEND_ENV = "IAMPG_EMULATOR_BACKEND"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the plugin's ini settings."""
    parser.addini(
        "iampg_profile",
        "iampg emulator profile for the session emulator (rds, aurora-express, dsql...)",
        default="",
    )
    parser.addini(
        "iampg_time_scale",
        "emulated seconds per real second for the iampg session emulator",
        default="1",
    )
    parser.addini(
        "iampg_user",
        "database user of the iampg_endpoint fixture (default: the backend's; DSQL: admin)",
        default="",
    )
    parser.addini(
        "iampg_credentials_lifetime",
        "emulated seconds the keys of iampg_credentials_server live",
        default="3600",
    )


def _ini_float(config: pytest.Config, name: str) -> float:
    text = str(config.getini(name)).strip()
    try:
        return float(text)
    except ValueError:
        raise pytest.UsageError(f"{name} must be a number, not {text!r}") from None


@pytest.fixture(scope="session")
def iampg_backend() -> Iterator[Backend]:
    """Return the real PostgreSQL behind the session emulator.

    ``$IAMPG_EMULATOR_BACKEND`` (a libpq DSN or URL of a server whose user may create
    roles) when set, left running at the end; otherwise a throwaway cluster (needs the
    PostgreSQL server binaries, found through ``$IAMPG_PG_BINDIR``, ``pg_config`` or the
    usual directories), deleted at the end of the session.
    """
    from iampg.emulator import Backend  # noqa: PLC0415 -- start nothing at import

    dsn = os.environ.get(_BACKEND_ENV)
    if dsn:
        yield Backend.from_dsn(dsn)
        return
    with Backend.temporary() as backend:
        yield backend


@pytest.fixture(scope="session")
def iampg_emulator(pytestconfig: pytest.Config, iampg_backend: Backend) -> Iterator[Emulator]:
    """Return an emulator running for the whole test session, in front of ``iampg_backend``.

    It knows the documented fake keys and every key ``iampg_credentials_server`` issues.
    Its profile and time scale come from the ``iampg_profile`` and ``iampg_time_scale``
    settings. It is shared by every test: moving its clock (``iampg_clock.advance``) ages
    every token signed before, also for later tests; prefer ``time_scale`` or tokens signed
    after the move.
    """
    from iampg.emulator import CredentialStore, Emulator  # noqa: PLC0415

    options: dict[str, object] = {"time_scale": _ini_float(pytestconfig, "iampg_time_scale")}
    profile = str(pytestconfig.getini("iampg_profile")).strip()
    if profile:
        if "profile" not in inspect.signature(Emulator).parameters:
            raise pytest.UsageError(
                "iampg_profile is set but this iampg emulator has no profiles: upgrade iampg"
            )
        options["profile"] = profile
    with Emulator(iampg_backend.dsn, credentials=CredentialStore(), **options) as emulator:  # type: ignore[arg-type]
        yield emulator


@pytest.fixture(scope="session")
def iampg_ca_file(iampg_emulator: Emulator) -> Path:
    """Return the PEM CA certificate of the session emulator, for ``sslrootcert``."""
    return iampg_emulator.ca_file


@pytest.fixture(scope="session")
def iampg_clock(iampg_emulator: Emulator) -> EmulatorClock:
    """Return the session emulator's clock; ``advance()`` it to expire tokens and keys.

    Give it to token providers as ``TokenProvider(..., clock=iampg_clock.monotonic)`` so
    both sides see the same time.
    """
    return iampg_emulator.clock


@pytest.fixture(scope="session")
def iampg_endpoint(
    pytestconfig: pytest.Config, iampg_emulator: Emulator, iampg_backend: Backend
) -> Endpoint:
    """Return an :class:`iampg.Endpoint` for the session emulator.

    It names the emulator's host name (signed into tokens and verified by TLS), dials its
    loopback address (``hostaddr``) and port, and uses ``sslmode=verify-full`` with
    ``iampg_ca_file``. The user is the ``iampg_user`` setting, else the backend's (``admin``
    for DSQL). Pass it to ``iampg.connect``, ``iampg.ConnectionPool`` or ``TokenProvider``.
    """
    from iampg import Endpoint  # noqa: PLC0415

    dsql = getattr(iampg_emulator, "service", "rds") == "dsql"
    user = str(pytestconfig.getini("iampg_user")).strip() or (None if dsql else iampg_backend.user)
    return Endpoint(
        iampg_emulator.host,
        user=user,
        port=iampg_emulator.port,
        hostaddr=iampg_emulator.listen_host,
        region=iampg_emulator.region,
        kind="dsql" if dsql else "rds",
        sslmode="verify-full",
        sslrootcert=str(iampg_emulator.ca_file),
        connect_timeout="10",
    )


@pytest.fixture
def iampg_aws_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, iampg_emulator: Emulator
) -> dict[str, str]:
    """Give botocore the documented fake keys and the emulator's region, and nothing else.

    Removes every ``AWS_*`` variable, points ``AWS_CONFIG_FILE`` and
    ``AWS_SHARED_CREDENTIALS_FILE`` at missing files, disables the instance metadata
    service, then sets ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (the emulator's
    first key) and ``AWS_REGION``/``AWS_DEFAULT_REGION``: a test can never reach a real AWS
    credential. Undone after the test.

    Returns:
        The variables set.
    """
    from iampg import _aws  # noqa: PLC0415

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    missing = str(tmp_path / "iampg-no-aws-config")
    env = {
        "AWS_CONFIG_FILE": missing,
        "AWS_SHARED_CREDENTIALS_FILE": missing,
        "AWS_EC2_METADATA_DISABLED": "true",
        **iampg_emulator.aws_env(),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # Providers share one signer per credential source in the process: start from none,
    # so credentials cached under another test's environment are not reused.
    _aws._shared.clear()  # noqa: SLF001
    return env


@pytest.fixture
def iampg_credentials_server(
    pytestconfig: pytest.Config,
    monkeypatch: pytest.MonkeyPatch,
    iampg_aws_env: dict[str, str],
    iampg_emulator: Emulator,
) -> Iterator[CredentialsServer]:
    """Serve rotating temporary keys to botocore, as ECS serves them to containers.

    A :class:`iampg.emulator.CredentialsServer` issuing keys into the session emulator's
    store, on its clock, with the ``iampg_credentials_lifetime`` setting as lifetime (fresh
    keys at every request). On top of ``iampg_aws_env``, the static keys are removed and
    ``AWS_CONTAINER_CREDENTIALS_FULL_URI``/``AWS_CONTAINER_AUTHORIZATION_TOKEN`` point
    botocore's default chain at the server. Its ``url`` is also an STS endpoint for
    ``AssumeRole``. Stopped after the test; use ``inject()`` for faults.
    """
    from iampg import _aws  # noqa: PLC0415
    from iampg.emulator import CredentialsServer  # noqa: PLC0415

    del iampg_aws_env  # requested for the isolation it sets up
    lifetime = _ini_float(pytestconfig, "iampg_credentials_lifetime")
    with CredentialsServer.for_emulator(iampg_emulator, lifetime=lifetime) as server:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        _aws._shared.clear()  # noqa: SLF001
        yield server
    _aws._shared.clear()  # noqa: SLF001
