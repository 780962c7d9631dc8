"""pytest plugin: an iampg emulator per test session, its endpoint, CA file, clock and AWS env.

Installed with ``iampg[emulator]`` and loaded by pytest automatically (entry point
``pytest11: iampg``); disable it with ``-p no:iampg`` (the settings below stay known, through
the ``iampg_settings`` entry point, so a project that sets them still runs). Importing it is
cheap: nothing starts until a test asks for a fixture, and a fixture used without the
``emulator`` extra fails with ``pip install 'iampg[emulator]'``.

Fixtures:

- ``iampg_backend`` (session): the real PostgreSQL behind the emulator.
- ``iampg_emulator`` (session): a running :class:`iampg.emulator.Emulator`.
- ``iampg_endpoint`` (session): an :class:`iampg.Endpoint` for it.
- ``iampg_ca_file`` (session): the CA certificate to verify it with.
- ``iampg_clock`` (session): its :class:`iampg.emulator.EmulatorClock`.
- ``iampg_aws_env``: botocore's environment with the documented fake keys, nothing else.
- ``iampg_credentials_server``: a :class:`iampg.emulator.CredentialsServer` botocore fetches
  rotating temporary keys from.
- ``iampg_policies``: the session emulator's :class:`iampg.emulator.PolicyStore`, to attach
  IAM policies to principals for one test (all detached after it).
- ``iampg_database_user``: a factory creating database users on the backend, granted
  ``rds_iam`` unless asked not to, for tests of who may log in.
- ``iampg_map_role`` (DSQL): a function ``map_role(role, arn=None)`` that runs ``AWS IAM
  GRANT <role> TO '<arn>'`` through the emulator as ``admin`` (default ARN: the emulator's
  principal); the mappings are revoked after the test.
- ``iampg_force_conflict`` (DSQL): :meth:`iampg.emulator.Emulator.force_conflict`, the next
  commit of a session then fails with ``40001 ... (OC000)``; unused ones are dropped after
  the test.

Settings (``[tool.pytest.ini_options]`` or ``pytest.ini``):

- ``iampg_preset``: the emulator's service preset (``rds``, ``aurora-serverless`` or
  ``aurora-express``, ``dsql``; every spelling :func:`iampg._defaults.canonical_preset`
  accepts). ``iampg_profile`` is its deprecated name (warns).
- ``iampg_time_scale``: emulated seconds per real second (default 1).
- ``iampg_user``: the database user of ``iampg_endpoint`` (default: the backend's user; for
  DSQL, ``admin``), created on the backend if it is missing.
- ``iampg_credentials_lifetime``: emulated seconds the credentials server's keys live
  (default 3600).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import pytest

from iampg.emulator._pytest_settings import register

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from iampg import Endpoint
    from iampg.emulator import Backend, CredentialsServer, Emulator, EmulatorClock, PolicyStore

__all__ = [
    "iampg_aws_env",
    "iampg_backend",
    "iampg_ca_file",
    "iampg_clock",
    "iampg_credentials_server",
    "iampg_database_user",
    "iampg_emulator",
    "iampg_endpoint",
    "iampg_force_conflict",
    "iampg_map_role",
    "iampg_policies",
]

_BACKEND_ENV = "IAMPG_EMULATOR_BACKEND"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the plugin's ini settings (also when loaded without its settings plugin)."""
    register(parser)


def _preset(config: pytest.Config) -> str | None:
    """Return the canonical ``iampg_preset`` (or deprecated ``iampg_profile``), if set."""
    from iampg._defaults import canonical_preset  # noqa: PLC0415
    from iampg.errors import ConfigurationError  # noqa: PLC0415

    preset = str(config.getini("iampg_preset")).strip()
    old = str(config.getini("iampg_profile")).strip()
    if old:
        warnings.warn(
            f"the iampg_profile setting is deprecated: use iampg_preset = {old}",
            DeprecationWarning,
            stacklevel=2,
        )
        if preset and preset != old:
            raise pytest.UsageError("set iampg_preset only, not also its old name iampg_profile")
        preset = old
    if not preset:
        return None
    try:
        return canonical_preset(preset)
    except ConfigurationError as exc:
        raise pytest.UsageError(f"iampg_preset: {exc}") from None


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
    Its service preset and time scale come from the ``iampg_preset`` and ``iampg_time_scale``
    settings. It is shared by every test: moving its clock (``iampg_clock.advance``) ages
    every token signed before, also for later tests; prefer ``time_scale`` or tokens signed
    after the move.
    """
    from iampg.emulator import CredentialStore, Emulator  # noqa: PLC0415

    options: dict[str, object] = {"time_scale": _ini_float(pytestconfig, "iampg_time_scale")}
    preset = _preset(pytestconfig)
    if preset:
        options["preset"] = preset
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
    for DSQL); it is created on the backend if missing. Pass it to ``iampg.connect``,
    ``iampg.ConnectionPool`` or ``TokenProvider``.
    """
    from iampg import Endpoint  # noqa: PLC0415

    dsql = iampg_emulator.service == "dsql"
    user = str(pytestconfig.getini("iampg_user")).strip() or (
        "admin" if dsql else iampg_backend.user
    )
    _ensure_role(iampg_backend, user, iam=not dsql)
    if dsql and user != "admin":  # a custom role logs in once mapped, as on DSQL
        _ensure_role(iampg_backend, "admin")
        _admin_execute(iampg_emulator, f"AWS IAM GRANT {user} TO '{iampg_emulator.principal}'")
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


def _admin_execute(emulator: Emulator, statement: str) -> None:
    """Run ``statement`` through a DSQL emulator as ``admin``."""
    import psycopg  # noqa: PLC0415

    from iampg.emulator._sigv4 import presign  # noqa: PLC0415

    token = presign(
        host=emulator.host,
        port=None,
        credentials=emulator.credentials,
        region=emulator.region,
        signed_at=emulator.clock.now(),
        service="dsql",
        action="DbConnectAdmin",
    )
    with psycopg.connect(
        emulator.conninfo("admin", password=token), autocommit=True, connect_timeout=10
    ) as conn:
        conn.execute(statement.encode())


def _require_dsql(emulator: Emulator, fixture: str) -> None:
    if emulator.service != "dsql":
        pytest.fail(f"{fixture} needs a DSQL emulator: set iampg_preset = dsql", pytrace=False)


@pytest.fixture
def iampg_map_role(
    iampg_emulator: Emulator, iampg_backend: Backend
) -> Iterator[Callable[..., None]]:
    """Return ``map_role(role, arn=None)``: ``AWS IAM GRANT`` as DSQL's admin would run it.

    The role is created on the backend if missing; ``arn`` defaults to the emulator's
    principal (the key tokens are signed with). Every mapping made is revoked afterwards.
    """
    _require_dsql(iampg_emulator, "iampg_map_role")
    _ensure_role(iampg_backend, "admin")
    made: list[tuple[str, str]] = []

    def map_role(role: str, arn: str | None = None) -> None:
        principal = arn or iampg_emulator.principal
        _ensure_role(iampg_backend, role)
        _admin_execute(iampg_emulator, f"AWS IAM GRANT {role} TO '{principal}'")
        made.append((role, principal))

    yield map_role
    for role, principal in made:
        _admin_execute(iampg_emulator, f"AWS IAM REVOKE {role} FROM '{principal}'")


@pytest.fixture
def iampg_force_conflict(iampg_emulator: Emulator) -> Iterator[Callable[..., None]]:
    """Return the session emulator's :meth:`~iampg.emulator.Emulator.force_conflict`.

    ``iampg_force_conflict(backend_pid=conn.info.backend_pid)`` makes that session's next
    commit fail as DSQL's loser of a race does (``40001``, ``(OC000)``); without arguments,
    the next commit of any session. Conflicts not used by the end of the test are dropped.
    """
    _require_dsql(iampg_emulator, "iampg_force_conflict")
    yield iampg_emulator.force_conflict
    iampg_emulator._forced.clear()  # noqa: SLF001


def _ensure_role(backend: Backend, user: str, *, iam: bool = False) -> None:
    """Create the endpoint's role on the backend, or fail at once saying why it cannot log in.

    A DSQL cluster's ``admin`` may do anything, so a new role is a superuser where the
    backend's user may create one. With ``iam``, the role (the backend's own user too) is
    granted ``rds_iam``, which an RDS-mode emulator requires as RDS does.
    """
    from iampg.emulator import BackendError  # noqa: PLC0415

    if user == backend.user and not iam:
        return
    try:
        backend.ensure_role(user, superuser=user != backend.user, iam=iam)
    except BackendError:
        try:
            backend.ensure_role(user, iam=iam)
        except BackendError as exc:
            raise pytest.UsageError(
                f"the iampg_endpoint user {user!r} does not exist on the backend and cannot "
                f"be created ({exc}): create the role, or point {_BACKEND_ENV} at a user "
                "that may create roles"
            ) from None


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


@pytest.fixture
def iampg_policies(iampg_emulator: Emulator) -> Iterator[PolicyStore]:
    """Return the session emulator's IAM policies; every policy is detached after the test.

    Attach a :class:`iampg.emulator.Policy` to a principal (the fake keys belong to
    :data:`iampg.emulator.FAKE_CREDENTIALS`'s ``principal``; keys from
    ``iampg_credentials_server`` to its role): from then on that principal's connections
    need a statement allowing ``rds-db:connect`` on ``iampg_emulator.resource_arn(user)``
    (DSQL: ``dsql:DbConnect``/``dsql:DbConnectAdmin`` on the cluster), as IAM requires.
    """
    iampg_emulator.policies.clear()
    yield iampg_emulator.policies
    iampg_emulator.policies.clear()


@pytest.fixture
def iampg_database_user(iampg_backend: Backend) -> Callable[..., str]:
    """Return ``make(name, *, iam=True) -> name``: create a login role on the backend.

    With ``iam=True`` the role is granted ``rds_iam``, which an RDS-mode emulator requires
    of every user logging in with a token, as RDS does; ``iam=False`` makes a user RDS
    would refuse (``PAM authentication failed``), revoking the grant if it existed. Roles
    are left in place (creating one again is harmless).
    """

    def make(name: str, *, iam: bool = True) -> str:
        iampg_backend.ensure_role(name, iam=iam)
        if not iam:
            _revoke_rds_iam(iampg_backend, name)
        return name

    return make


def _revoke_rds_iam(backend: Backend, name: str) -> None:
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    with psycopg.connect(backend.dsn, autocommit=True, connect_timeout=10) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'rds_iam'").fetchone():
            conn.execute(sql.SQL("REVOKE rds_iam FROM {}").format(sql.Identifier(name)))
