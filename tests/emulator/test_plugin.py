"""Tests of the pytest plugin: a small user test suite run with pytester against the fixtures."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from iampg.emulator import Backend
from iampg.emulator._backend import find_bindir
from iampg.errors import ConfigurationError

pytest_plugins = ["pytester"]

PLUGIN = "iampg.emulator.pytest_plugin"
ROOT = Path(__file__).resolve().parents[2]


def installed() -> bool:
    """Tell whether the pytest11 entry point is in the installed metadata (pytest loads it)."""
    return any(ep.value == PLUGIN for ep in importlib.metadata.entry_points(group="pytest11"))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run the user's suite with the plugin, loaded as pytest would from the entry point."""
    plugin = [] if installed() else ["-p", PLUGIN]
    return pytester.runpytest_inprocess(*plugin, "-p", "no:cacheprovider", *args)


@pytest.fixture
def user_suite(
    pytester: pytest.Pytester, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    """A user project whose tests use the fixtures; its emulator runs in front of our backend."""
    monkeypatch.setenv("IAMPG_EMULATOR_BACKEND", backend.dsn)
    pytester.makeini(
        """
        [pytest]
        filterwarnings = error
        iampg_time_scale = 30
        iampg_credentials_lifetime = 600
        """
    )
    return pytester


USER_TESTS = """
import os
import threading

import botocore.session
import psycopg

import iampg
from iampg.emulator import CredentialsServer, Emulator

seen = []


def test_connects_with_the_fake_keys(iampg_endpoint, iampg_aws_env, iampg_emulator):
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIAIOSFODNN7EXAMPLE"
    assert os.environ["AWS_REGION"] == iampg_emulator.region
    assert not os.path.exists(os.environ["AWS_CONFIG_FILE"])
    with iampg.connect(iampg_endpoint) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert iampg_emulator.events[-1].outcome == "accepted"
    seen.append(iampg_emulator)


def test_one_emulator_per_session(iampg_emulator, iampg_ca_file, iampg_clock, iampg_endpoint):
    seen.append(iampg_emulator)
    assert isinstance(iampg_emulator, Emulator)
    assert seen[0] is seen[-1]
    assert iampg_ca_file == iampg_emulator.ca_file and iampg_ca_file.exists()
    assert iampg_clock is iampg_emulator.clock
    assert iampg_clock.time_scale == 30
    assert iampg_endpoint.params["sslmode"] == "verify-full"
    assert iampg_endpoint.params["sslrootcert"] == str(iampg_ca_file)
    assert iampg_endpoint.host == iampg_emulator.host
    assert iampg_endpoint.hostaddr == "127.0.0.1"
    assert iampg_endpoint.port == iampg_emulator.port


def test_credentials_server(iampg_credentials_server, iampg_endpoint, iampg_clock):
    assert isinstance(iampg_credentials_server, CredentialsServer)
    assert "AWS_ACCESS_KEY_ID" not in os.environ
    assert botocore.session.Session().get_credentials().method == "container-role"
    provider = iampg.TokenProvider(iampg_endpoint, clock=iampg_clock.monotonic)
    with iampg.connect(provider=provider) as conn:
        assert conn.execute("select 2").fetchone() == (2,)
    issued = iampg_credentials_server.issued
    assert issued and issued[-1].access_key_id.startswith("ASIAEXAMPLE")
    assert iampg_credentials_server.lifetime == 600


def test_environment_is_restored_after_each_test():
    assert "AWS_CONTAINER_CREDENTIALS_FULL_URI" not in os.environ
    assert not [t for t in threading.enumerate() if t.name == "iampg-credentials-server"]
"""


def test_fixtures_serve_a_user_test_suite(user_suite: pytest.Pytester) -> None:
    """The fixtures give a user's tests a working emulator, endpoint, env and key server."""
    user_suite.makepyfile(test_user=USER_TESTS)
    result = run(user_suite, "-q")
    result.assert_outcomes(passed=4)


STRICT_TESTS = """
import pytest

import iampg
from iampg.emulator import FAKE_CREDENTIALS, Policy, Statement


def test_database_user_without_rds_iam(iampg_endpoint, iampg_aws_env, iampg_emulator,
                                       iampg_database_user):
    user = iampg_database_user("plugin_no_iam", iam=False)
    with pytest.raises(iampg.AuthenticationError, match="PAM authentication failed"):
        iampg.connect(iampg_endpoint.replace(user=user)).close()
    assert iampg_emulator.events[-1].reason == "not granted rds_iam"
    iampg.connect(iampg_endpoint.replace(user=iampg_database_user("plugin_no_iam"))).close()


def test_policy_refuses(iampg_endpoint, iampg_aws_env, iampg_emulator, iampg_policies):
    iampg_policies.attach(
        FAKE_CREDENTIALS.principal, Policy(Statement.deny("rds-db:connect", "*"))
    )
    with pytest.raises(iampg.AuthenticationError):
        iampg.connect(iampg_endpoint).close()
    assert iampg_emulator.events[-1].reason == "explicitly denied"


def test_policies_are_detached_after_each_test(iampg_endpoint, iampg_aws_env, iampg_policies):
    assert iampg_policies.policies(FAKE_CREDENTIALS.principal) == []
    iampg.connect(iampg_endpoint).close()
"""


def test_strictness_fixtures_serve_a_user_test_suite(user_suite: pytest.Pytester) -> None:
    """iampg_database_user makes users with or without rds_iam; iampg_policies resets."""
    user_suite.makepyfile(test_user_rules=STRICT_TESTS)
    result = run(user_suite, "-q")
    result.assert_outcomes(passed=3)


def test_nothing_starts_until_a_fixture_is_requested(user_suite: pytest.Pytester) -> None:
    """A suite that asks for no fixture starts no emulator, server or cluster."""
    user_suite.makepyfile(
        test_plain="""
        import sys, threading

        def test_plain():
            names = {t.name for t in threading.enumerate()}
            assert "iampg-emulator" not in names
            assert "iampg-credentials-server" not in names
        """
    )
    # In a process of its own: the outer session may hold emulator threads of its own.
    plugin = [] if installed() else ["-p", PLUGIN]
    result = user_suite.runpytest_subprocess(*plugin, "-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("spelling", ["aurora-serverless", "aurora-express", "Aurora_Express"])
def test_preset_setting_reaches_the_emulator(user_suite: pytest.Pytester, spelling: str) -> None:
    """The iampg_preset ini setting, in any spelling, is passed to the emulator as preset=."""
    user_suite.makeini(
        f"""
        [pytest]
        filterwarnings = error
        iampg_preset = {spelling}
        """
    )
    user_suite.makepyfile(
        test_preset="""
        def test_preset(iampg_emulator):
            assert iampg_emulator.preset.name == "aurora-serverless"
        """
    )
    result = run(user_suite, "-q")
    result.assert_outcomes(passed=1)


def test_profile_setting_is_a_deprecated_alias(user_suite: pytest.Pytester) -> None:
    """iampg_profile still sets the preset, with a DeprecationWarning naming iampg_preset."""
    user_suite.makeini(
        """
        [pytest]
        iampg_profile = aurora-express
        """
    )
    user_suite.makepyfile(
        test_preset="""
        def test_preset(iampg_emulator):
            assert iampg_emulator.preset.name == "aurora-serverless"
        """
    )
    result = run(user_suite, "-q", "-W", "always::DeprecationWarning")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*iampg_profile setting is deprecated: use iampg_preset*"])


def test_unknown_preset_is_a_usage_error(user_suite: pytest.Pytester) -> None:
    """A preset name no spelling matches fails the fixture, listing the accepted names."""
    user_suite.makeini("[pytest]\niampg_preset = serverless\n")
    user_suite.makepyfile(test_p="def test_p(iampg_emulator):\n    pass\n")
    result = run(user_suite, "-q")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*iampg_preset: unknown preset 'serverless': use one of*"])


def test_dsql_preset_creates_the_role_it_logs_in_as(
    user_suite: pytest.Pytester, backend: Backend
) -> None:
    """iampg_preset = dsql: the endpoint's admin role is created, and a pool logs in as it."""
    user_suite.makeini(
        "[pytest]\nfilterwarnings = error\niampg_preset = dsql\niampg_user = dsql_app\n"
    )
    user_suite.makepyfile(
        test_dsql_pool="""
        import iampg

        def test_pool(iampg_endpoint, iampg_aws_env):
            with iampg.ConnectionPool(iampg_endpoint, min_size=1, open=True, timeout=10) as pool:
                with pool.connection() as conn:
                    assert conn.execute("select current_user").fetchone() == ("dsql_app",)
        """
    )
    with psycopg.connect(backend.dsn, autocommit=True) as conn:
        conn.execute("drop role if exists dsql_app")
    result = run(user_suite, "-q")
    result.assert_outcomes(passed=1)


def test_a_role_that_cannot_be_created_is_reported_at_once(
    user_suite: pytest.Pytester, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing endpoint role the backend user may not create fails the fixture, naming it."""
    with psycopg.connect(backend.dsn, autocommit=True) as conn:
        conn.execute("drop role if exists no_such_app")
        if conn.execute("select 1 from pg_roles where rolname = 'iampg_plain'").fetchone() is None:
            conn.execute("create role iampg_plain login")
    plain = conninfo_to_dict(backend.dsn)
    plain["user"] = "iampg_plain"
    monkeypatch.setenv("IAMPG_EMULATOR_BACKEND", make_conninfo(**plain))  # type: ignore[arg-type]
    user_suite.makeini("[pytest]\niampg_user = no_such_app\n")
    user_suite.makepyfile(test_role="def test_role(iampg_endpoint):\n    pass\n")
    result = run(user_suite, "-q")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*the iampg_endpoint user 'no_such_app' does not exist on the backend and cannot be*"]
    )
    assert "PoolTimeout" not in result.stdout.str()


def test_disabled_plugin_keeps_its_settings_valid(pytester: pytest.Pytester) -> None:
    """-p no:iampg with iampg_* settings and warnings as errors runs, not an INTERNALERROR."""
    if not installed():
        pytest.skip("needs the installed entry points")
    pytester.makeini(
        """
        [pytest]
        filterwarnings = error
        iampg_preset = dsql
        iampg_profile = dsql
        iampg_time_scale = 2
        """
    )
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:iampg", "-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_bad_time_scale_is_a_usage_error(user_suite: pytest.Pytester) -> None:
    """A non-numeric iampg_time_scale fails the fixture with a message naming the setting."""
    user_suite.makeini(
        """
        [pytest]
        iampg_time_scale = fast
        """
    )
    user_suite.makepyfile(test_scale="def test_scale(iampg_emulator):\n    pass\n")
    result = run(user_suite, "-q")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*iampg_time_scale must be a number*"])


def test_fixtures_are_documented(user_suite: pytest.Pytester) -> None:
    """pytest --fixtures lists every iampg_ fixture with its docstring."""
    result = run(user_suite, "--fixtures")
    for name, scope, summary in [
        ("iampg_backend", " [[]session scope[]]", "Return the real PostgreSQL behind the session"),
        ("iampg_emulator", " [[]session scope[]]", "Return an emulator running for the whole"),
        ("iampg_ca_file", " [[]session scope[]]", "Return the PEM CA certificate"),
        ("iampg_clock", " [[]session scope[]]", "Return the session emulator's clock"),
        ("iampg_endpoint", " [[]session scope[]]", "Return an :class:`iampg.Endpoint`"),
        ("iampg_aws_env", "", "Give botocore the documented fake keys"),
        ("iampg_credentials_server", "", "Serve rotating temporary keys to botocore"),
        ("iampg_policies", "", "Return the session emulator's IAM policies"),
        ("iampg_database_user", "", "Return ``make(name, *, iam=True) -> name``"),
    ]:
        result.stdout.fnmatch_lines([f"{name}{scope} -- *pytest_plugin.py:*", f"    {summary}*"])


def test_ini_settings_are_registered(user_suite: pytest.Pytester) -> None:
    """The plugin's settings pass --strict-config (they are registered)."""
    user_suite.makeini(
        """
        [pytest]
        iampg_preset = rds
        iampg_time_scale = 2
        iampg_user = postgres
        iampg_credentials_lifetime = 60
        """
    )
    user_suite.makepyfile(test_ok="def test_ok():\n    pass\n")
    result = run(user_suite, "-q", "--strict-config")
    result.assert_outcomes(passed=1)


def test_importing_the_plugin_is_cheap() -> None:
    """Loading the plugin imports no cryptography, botocore or gateway and starts no thread."""
    code = textwrap.dedent(
        f"""
        import sys, threading
        import {PLUGIN}
        heavy = [m for m in ("cryptography", "botocore", "iampg.emulator._gateway",
                             "iampg.emulator._backend") if m in sys.modules]
        print(heavy, threading.active_count())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == ["[]", "1"]


def test_entry_point_is_declared() -> None:
    """pyproject.toml registers the plugin as the pytest11 entry point named iampg."""
    text = (ROOT / "pyproject.toml").read_text()
    pattern = r"^\[project\.entry-points\.pytest11\]\n(.*?)(?=^\[|\Z)"
    section = re.search(pattern, text, re.MULTILINE | re.DOTALL)
    assert section is not None
    entries = [line for line in section[1].splitlines() if line and not line.startswith("#")]
    assert entries == [
        f'iampg = "{PLUGIN}"',
        'iampg_settings = "iampg.emulator._pytest_settings"',
    ]


@pytest.mark.slow
def test_without_a_dsn_the_backend_is_a_throwaway_cluster(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no $IAMPG_EMULATOR_BACKEND the session gets a temporary cluster, removed at end."""
    try:
        find_bindir()
    except ConfigurationError:
        pytest.skip("no PostgreSQL server binaries to start a throwaway cluster with")
    monkeypatch.delenv("IAMPG_EMULATOR_BACKEND", raising=False)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(
        test_cluster="""
        from pathlib import Path

        import iampg

        def test_cluster(iampg_backend, iampg_endpoint, iampg_aws_env):
            assert iampg_backend.kind == "temporary"
            Path("datadir.txt").write_text(str(iampg_backend.datadir))
            with iampg.connect(iampg_endpoint) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
        """
    )
    result = run(pytester, "-q")
    result.assert_outcomes(passed=1)
    datadir = Path((pytester.path / "datadir.txt").read_text())
    assert datadir.name
    assert not datadir.exists()


EXAMPLES = ROOT / "examples" / "pytest_emulator"
EXAMPLE_TESTS = {"rds": 1, "aurora_serverless": 1, "dsql": 15}  # test functions per project
HOWTO = ROOT / "docs" / "howto" / "emulator.md"


@pytest.mark.parametrize("service", ["rds", "aurora_serverless", "dsql"])
def test_each_services_example_project_passes(
    pytester: pytest.Pytester, backend: Backend, monkeypatch: pytest.MonkeyPatch, service: str
) -> None:
    """The tiny project the how-to shows for each service passes, run as pytest on its own."""
    monkeypatch.setenv("IAMPG_EMULATOR_BACKEND", backend.dsn)
    for path in (EXAMPLES / service).iterdir():
        if path.is_file():
            shutil.copy(path, pytester.path / path.name)
    plugin = [] if installed() else ["-p", PLUGIN]
    result = pytester.runpytest_subprocess(*plugin, "-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=EXAMPLE_TESTS[service])


def test_example_projects_are_shown_in_the_howto() -> None:
    """Every file of the example projects appears verbatim in docs/howto/emulator.md."""
    howto = HOWTO.read_text()
    files = sorted(p for p in EXAMPLES.rglob("*.*") if "__pycache__" not in p.parts)
    assert len(files) == 7
    for path in files:
        assert path.read_text() in howto, path
