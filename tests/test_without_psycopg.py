"""Without psycopg: the token core imports and runs where psycopg (or its libpq) cannot load.

The subprocess tests install an import hook that fails every ``psycopg`` import as a slim
image without libpq does (``ImportError``), then use iampg as an asyncpg-only or Lambda user
would. The parser tests hold iampg's own reading of connection strings (used there) to libpq's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import iampg
from iampg import _conninfo
from iampg.emulator import Emulator
from iampg.errors import ConfigurationError

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
}
HOST = "mydb.cluster-abc.us-east-1.rds.amazonaws.com"

# Installed first in the child: psycopg, psycopg_pool and psycopg_binary cannot be imported.
BLOCKER = textwrap.dedent(
    """
    import sys

    class NoLibpq:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("psycopg", "psycopg_pool", "psycopg_binary", "psycopg_c"):
                raise ImportError("no pq wrapper available (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoLibpq())
    """
)


def run_blocked(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (``args`` in ``sys.argv``) in a fresh interpreter without psycopg."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PG"))}
    env.update(FAKE_ENV, AWS_EC2_METADATA_DISABLED="true")
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_token_core_runs_without_psycopg() -> None:
    """Endpoints, providers, signers and the DSN helpers work where psycopg cannot load."""
    out = run_blocked(
        f"""
        import json, sys
        import iampg
        from iampg._sigv4 import EnvSigner
        from urllib.parse import urlsplit, unquote
        ep = iampg.Endpoint.parse(
            "postgresql://app@{HOST}:5432/shop?application_name=a%20b&connect_timeout=5"
        )
        same = iampg.Endpoint.parse("host={HOST} user=app dbname=shop application_name='a b' "
                                    "connect_timeout=5")
        botocore = iampg.TokenProvider(ep)
        stdlib = iampg.TokenProvider(ep, signer=EnvSigner.from_environ(__import__("os").environ,
                                                                      endpoint=ep))
        token = botocore.token()
        url = iampg.url(ep, botocore)
        try:
            iampg.ConnectionPool
        except ImportError as exc:
            pool_error = str(exc)
        print(json.dumps({{
            "same": ep == same,
            "app": ep.params.get("application_name"),
            "token": "X-Amz-Signature=" in token and "DBUser=app" in token,
            "stdlib": "X-Amz-Signature=" in stdlib.token(),
            "url": unquote(urlsplit(url).password) == token,
            "conninfo": iampg.conninfo(ep, botocore).startswith("host={HOST} port=5432 "),
            "env": iampg.env(ep, botocore)["PGPASSWORD"] == token,
            "sqlalchemy": iampg.sqlalchemy_url(ep, botocore).startswith("postgresql+psycopg://"),
            "errors": [c.__name__ for c in iampg.AuthenticationError.__mro__[:3]],
            "unavailable": issubclass(iampg.UnavailableError, iampg.Error),
            "pool_error": pool_error,
            "loaded": sorted(m for m in sys.modules if m.split(".")[0].startswith("psycopg")),
        }}))
        """
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    for check in ("same", "token", "stdlib", "url", "conninfo", "env", "sqlalchemy"):
        assert report[check], check
    assert report["app"] == "a b"
    assert report["errors"] == ["AuthenticationError", "Error", "Exception"]
    assert report["unavailable"]
    assert "needs psycopg" in report["pool_error"]
    assert report["loaded"] == []


def test_cli_token_url_env_run_without_psycopg() -> None:
    """``iampg token``, ``url`` and ``env`` print what they print with psycopg."""
    out = run_blocked(
        f"""
        import sys
        from iampg.cli import main
        codes = [
            main(["token", "{HOST}", "--user", "app"]),
            main(["url", "postgresql://app@{HOST}/shop"]),
            main(["env", "{HOST}", "--user", "app"]),
            main(["url", "postgresql://app@{HOST}/shop?nosuchkey=1"]),
        ]
        print("codes", codes)
        """
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[-1] == "codes [0, 0, 0, 2]"
    assert lines[0].startswith(f"{HOST}:5432/?Action=connect")
    assert lines[1].startswith("postgresql://app:")
    assert "/shop?sslmode=verify-full" in lines[1]
    assert any(line.startswith("export PGPASSWORD=") for line in lines)
    assert "unknown connection parameter 'nosuchkey'" in out.stderr


def test_cli_doctor_runs_without_psycopg(emulator: Emulator) -> None:
    """``iampg doctor`` runs every check up to the login, which fails naming what to install.

    No traceback; the human report and ``--json`` both say ``authentication`` failed (the
    token was never tried against the server) and exit 1.
    """
    doctor = "import sys\nfrom iampg.cli import main\nsys.exit(main(['doctor', *sys.argv[1:]]))"
    args = [
        emulator.host,
        "--user",
        "postgres",
        "--port",
        str(emulator.port),
        "--hostaddr",
        emulator.listen_host,
        "--sslrootcert",
        str(emulator.ca_file),
        "--timeout",
        "5",
    ]
    human = run_blocked(doctor, *args)
    assert "Traceback" not in human.stderr, human.stderr[-2000:]
    assert human.returncode == 1, human.stdout + human.stderr[-2000:]
    rows = [line.split() for line in human.stdout.splitlines()]
    shown = {row[1]: row[0] for row in rows if row and row[0] in {"PASS", "FAIL", "SKIP"}}
    assert shown == {**dict.fromkeys(PASSING, "PASS"), "authentication": "FAIL", "query": "SKIP"}
    assert "needs psycopg with a libpq (pip install 'psycopg[binary]')" in human.stdout
    assert human.stdout.splitlines()[-1] == "failed: authentication"

    machine = run_blocked(doctor, *args, "--json")
    assert machine.returncode == 1, machine.stderr[-2000:]
    report = json.loads(machine.stdout)
    checks = {check["name"]: check for check in report["checks"]}
    assert report["ok"] is False
    assert {name: check["status"] for name, check in checks.items()} == {
        **dict.fromkeys(PASSING, "pass"),
        "authentication": "fail",
        "query": "skip",
    }
    assert "psycopg[binary]" in checks["authentication"]["fix"]
    assert "X-Amz-" not in human.stdout + machine.stdout


PASSING = ["endpoint", "credentials", "token", "dns", "tcp", "tls"]


def test_import_iampg_imports_no_psycopg() -> None:
    """``import iampg`` loads no psycopg; the first psycopg helper looked up does."""
    code = (
        "import sys, iampg; a = 'psycopg' in sys.modules; iampg.ConnectionPool; "
        "print(a, 'psycopg_pool' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["False", "True"]


def test_errors_are_psycopg_errors_where_psycopg_exists() -> None:
    """With psycopg, ``except psycopg.OperationalError`` still catches iampg's two errors."""
    import psycopg

    assert issubclass(iampg.AuthenticationError, psycopg.OperationalError)
    assert issubclass(iampg.UnavailableError, psycopg.OperationalError)
    assert iampg.AuthenticationError is iampg.errors.AuthenticationError
    with pytest.raises(psycopg.OperationalError):
        raise iampg.AuthenticationError("refused")


# -- iampg's own reading of connection strings agrees with libpq's -------------------------

EXAMPLES = [
    "host=h user=app dbname=shop",
    "  host = h   port=5433 user='a b' ",
    r"host=h user=it\'s dbname='x\\y' application_name=''",
    "host=h options='-c search_path=a,b'",
    "postgresql://app@h/shop",
    "postgres://app:p%40ss@h:5433/sh%2Fop?sslmode=require&application_name=a%20b",
    "postgresql://[::1]:5432/db",
    "postgresql://h1:5432,h2:5433/db?target_session_attrs=read-write",
    "postgresql://h?dbname=x&user=u",
    "postgresql://",
    "postgresql:///db?host=/tmp",
    "postgresql://h/db?ssl=true",
]
BAD = [
    "host=h user",
    "host='h",
    "nosuchkey=1",
    "postgresql://h/db?nosuchkey=1",
    "postgresql://h/db?a",
    "postgresql://[::1/db",
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_python_parser_reads_what_libpq_reads(text: str) -> None:
    """iampg's parser (used without libpq) returns libpq's parameters."""
    expected = {k: v for k, v in conninfo_to_dict(text).items() if v is not None}
    assert _conninfo.parse_python(text) == expected


@pytest.mark.parametrize("text", BAD)
def test_python_parser_refuses_what_libpq_refuses(text: str) -> None:
    """What libpq cannot parse, iampg's parser refuses too."""
    with pytest.raises(psycopg_programming_error()):
        conninfo_to_dict(text)
    with pytest.raises(ConfigurationError, match="cannot parse the connection string"):
        _conninfo.parse_python(text)


def psycopg_programming_error() -> type[Exception]:
    import psycopg

    return psycopg.ProgrammingError


VALUES = st.text(
    alphabet=st.sampled_from([*" '\\=\t\"%&/:?@,", "a", "é", "Z", "0"]),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["host", "user", "dbname", "options"]), VALUES))
def test_python_conninfo_writes_what_psycopg_writes(params: dict[str, str]) -> None:
    """Without psycopg, ``key=value`` strings are written byte for byte as psycopg writes them."""
    text = " ".join(f"{k}={_conninfo._quote(v)}" for k, v in params.items())
    assert text == make_conninfo(**params)
    assert _conninfo.parse_python(text) == conninfo_to_dict(text)
