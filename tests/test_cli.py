"""The iampg command: tokens on stdout, clear errors on stderr, meaningful exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from psycopg.conninfo import conninfo_to_dict

import iampg
from iampg import TokenProvider
from iampg.cli import main
from iampg.emulator import Emulator

HOST = "mydb.cluster-abc.us-east-1.rds.amazonaws.com"


def test_token_prints_only_the_token(capsys: pytest.CaptureFixture[str]) -> None:
    """``iampg token`` prints one line: a token for the host, port and user."""
    assert main(["token", HOST, "--user", "app"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith(f"{HOST}:5432/?Action=connect&DBUser=app&")


def test_url_is_percent_encoded(capsys: pytest.CaptureFixture[str]) -> None:
    """``iampg url`` prints a URL whose password decodes to a token for the user."""
    assert main(["url", f"postgresql://app@{HOST}/shop?application_name=x"]) == 0
    text = capsys.readouterr().out.strip()
    parts = urlsplit(text)
    assert unquote(parts.password or "").startswith(f"{HOST}:5432/?Action=connect")
    assert conninfo_to_dict(text)["application_name"] == "x"


def test_url_alembic_doubles_percent_signs(capsys: pytest.CaptureFixture[str]) -> None:
    """The alembic format survives ConfigParser interpolation."""
    import configparser

    assert main(["url", HOST, "-U", "app", "--format", "alembic"]) == 0
    text = capsys.readouterr().out.strip()
    parser = configparser.ConfigParser()
    parser.read_string(f"[alembic]\nsqlalchemy.url = {text}\n")
    from sqlalchemy.engine import make_url

    url = make_url(parser["alembic"]["sqlalchemy.url"])
    assert (url.drivername, url.username) == ("postgresql+psycopg", "app")
    assert str(url.password).startswith(f"{HOST}:5432/?Action=connect&DBUser=app&")


def test_env_prints_shell_exports(capsys: pytest.CaptureFixture[str]) -> None:
    """``iampg env`` prints export lines that a POSIX shell evaluates."""
    assert main(["env", HOST, "-U", "app", "-d", "shop"]) == 0
    out = capsys.readouterr().out
    result = subprocess.run(
        ["sh", "-c", out + 'printf "%s|%s|%s" "$PGHOST" "$PGDATABASE" "$PGSSLMODE"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == f"{HOST}|shop|verify-full"
    assert "export PGPASSWORD=" in out


def test_bad_input_is_one_line_on_stderr_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A host without a region: exit 2, a message naming the fix, no traceback."""
    assert main(["token", "db.internal", "-U", "app"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "region" in captured.err
    assert "Traceback" not in captured.err


def test_missing_credentials_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No AWS credentials: exit 1 and a message saying how to provide them."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert main(["token", HOST, "-U", "app"]) == 1
    assert "no AWS credentials found" in capsys.readouterr().err


def test_help_works_for_every_command() -> None:
    """``--help`` works for the command and each subcommand."""
    for args in ([], ["token"], ["url"], ["env"], ["emulate"]):
        result = subprocess.run(
            [sys.executable, "-m", "iampg.cli", *args, "--help"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "usage: iampg" in result.stdout


# -- more formats ---------------------------------------------------------------------------


def test_url_sqlalchemy_format_reads_back(capsys: pytest.CaptureFixture[str]) -> None:
    """``--format sqlalchemy`` prints a URL SQLAlchemy parses into the token and options."""
    from sqlalchemy.engine import make_url

    assert main(["url", HOST, "-U", "app", "--format", "sqlalchemy"]) == 0
    parsed = make_url(capsys.readouterr().out.strip())
    assert parsed.drivername == "postgresql+psycopg"
    assert str(parsed.password).startswith(f"{HOST}:5432/?Action=connect&DBUser=app&")
    assert parsed.query["sslmode"] == "verify-full"


def test_url_sqlalchemy_driver_is_validated(capsys: pytest.CaptureFixture[str]) -> None:
    """A driver name that is not an identifier is a usage error (exit 2)."""
    assert main(["url", HOST, "-U", "app", "--format", "sqlalchemy", "--driver", "a/b"]) == 2
    assert "driver" in capsys.readouterr().err


def test_url_pgpass_format_escapes_colons(capsys: pytest.CaptureFixture[str]) -> None:
    """``--format pgpass`` prints host:port:dbname:user:token with the token's colon escaped."""
    assert main(["url", HOST, "-U", "app", "-d", "shop", "--format", "pgpass"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{HOST}:5432:shop:app:{HOST}\\:5432/?Action=connect&DBUser=app&")


def test_env_dotenv_and_json_formats(capsys: pytest.CaptureFixture[str]) -> None:
    """``env --format dotenv`` quotes only what needs it; ``--format json`` is an object."""
    assert (
        main(
            ["env", f"postgresql://app@{HOST}/shop?application_name=my%20app", "--format", "dotenv"]
        )
        == 0
    )
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["PGAPPNAME"] == "'my app'"
    assert lines["PGHOST"] == HOST
    assert lines["PGPASSWORD"].startswith(f"{HOST}:5432/?Action=connect&DBUser=app&")
    assert main(["env", HOST, "-U", "app", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["PGUSER"] == "app"


def test_usage_errors_exit_2_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown options and arguments after -- for a command other than psql: exit 2."""
    assert main(["token", "--no-such-option"]) == 2
    assert main(["token", HOST, "-U", "app", "--", "x"]) == 2
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "only psql takes arguments after --" in err
    assert "Traceback" not in err


# The exit codes each command can return; each one is produced by a test below (or, for
# doctor and emulate, in test_cli_doctor.py and emulator/test_cli_emulate.py).
EXIT_CODES = {
    "iampg": {0, 1, 2, 127, 130},
    "token": {0, 1, 2, 130},
    "url": {0, 1, 2, 130},
    "env": {0, 1, 2, 130},
    "psql": {0, 1, 2, 3, 127, 130},
    "doctor": {0, 1, 2, 130},
    "emulate": {0, 1, 2},
}


@pytest.mark.parametrize("command", sorted(EXIT_CODES))
def test_help_lists_exactly_the_exit_codes_the_command_returns(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Each command's --help lists the exit codes it can return, and no other."""
    assert main([] if command == "iampg" else [command, "--help"]) == (
        2 if command == "iampg" else 0
    )
    if command == "iampg":
        assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    listed = text.partition("exit codes:")[2]
    assert {int(code) for code in re.findall(r"(?:^|[ (])(\d+) [a-zA-Z]", listed)} == (
        EXIT_CODES[command]
    )


@pytest.mark.parametrize("command", ["token", "url", "env", "psql"])
def test_signing_commands_fail_with_1_and_stop_with_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """No credentials: exit 1; Ctrl-C while signing: exit 130, one line, no traceback."""
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("psql was started"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert main([command, HOST, "-U", "app"]) == 1
    assert "no AWS credentials found" in capsys.readouterr().err

    def interrupted(self: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(TokenProvider, "token", interrupted)
    assert main([command, HOST, "-U", "app"]) == 130
    assert capsys.readouterr().err == "iampg: interrupted\n"


@pytest.mark.parametrize("command", ["token", "url", "env"])
def test_signing_commands_succeed_with_0_and_refuse_with_2(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """A good endpoint: exit 0 and output; a bad one: exit 2 and one line on stderr."""
    assert main([command, HOST, "-U", "app"]) == 0
    assert capsys.readouterr().out
    assert main([command, HOST, "-U", "app", "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith(f"iampg {command}: port must be")


def test_version_and_python_dash_m(capsys: pytest.CaptureFixture[str]) -> None:
    """``iampg --version`` prints the version; ``python -m iampg`` is the same command."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"iampg {iampg.__version__}\n"
    result = subprocess.run(
        [sys.executable, "-m", "iampg", "token", HOST, "-U", "app"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{HOST}:5432/?Action=connect&DBUser=app&")
    assert result.stdout.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "ours", "psqls"),
    [
        (["-c", "select 1"], [], ["-c", "select 1"]),
        ([HOST, "-U", "app", "-tAc", "select 1"], [HOST, "-U", "app"], ["-tAc", "select 1"]),
        (["-Xq", "-p", "5433", "-cselect 1"], ["-p", "5433"], ["-Xq", "-cselect 1"]),
        (
            ["--command=select 1", "--set", "X=1", "-d", "shop", "--csv"],
            ["-d", "shop"],
            ["--command=select 1", "--set", "X=1", "--csv"],
        ),
        (["-v", "ON_ERROR_STOP=1", "-f", "x.sql", "-H", HOST], ["-H", HOST], None),
        (["--port=5433", "-Usomeone", "-l"], ["--port=5433", "-Usomeone"], ["-l"]),
    ],
)
def test_psql_options_are_told_apart_from_iampgs(
    args: list[str], ours: list[str], psqls: list[str] | None
) -> None:
    """psql's own options go to psql in order, with their values; iampg keeps its own."""
    from iampg.cli import _parser, _split_psql, _subparser

    mine, theirs = _split_psql(args, _subparser(_parser(), "psql"))
    assert mine == ours
    assert theirs == (psqls if psqls is not None else [a for a in args if a not in ours])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frobnicate"], "unknown option --frobnicate: put psql's options after --"),
        (["-tU", "app"], "unknown option -U in -tU: give iampg's options separately"),
        (["-?"], "unknown option -? in -?"),
    ],
)
def test_psql_options_that_are_unclear_are_refused(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """An option neither iampg nor psql has, or a cluster mixing both: exit 2, what to do."""
    assert main(["psql", HOST, "-U", "app", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"iampg psql: {message}")
    assert err.count("\n") == 1


# -- psql -----------------------------------------------------------------------------------

PSQL = shutil.which("psql")


def emulator_args(emu: Emulator) -> list[str]:
    return [
        emu.host,
        "--user",
        "postgres",
        "--port",
        str(emu.port),
        "--hostaddr",
        emu.listen_host,
        "--sslmode",
        "verify-full",
        "--sslrootcert",
        str(emu.ca_file),
    ]


def run_cli(args: list[str], path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "iampg.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )


@pytest.mark.skipif(PSQL is None, reason="needs the psql program")
def test_psql_gets_the_token_in_its_environment_only(emulator: Emulator, tmp_path: Path) -> None:
    """``iampg psql -- ARGS`` runs the real psql through the emulator; argv is exactly ARGS."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "psql"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > "{tmp_path}/argv"\n'
        f'printf "%s" "$PGPASSWORD" > "{tmp_path}/token"\n'
        f'exec "{PSQL}" "$@"\n'
    )
    wrapper.chmod(0o755)
    query = "select current_user, current_setting('application_name')"
    psql_args = ["-X", "-A", "-t", "-c", query]
    result = run_cli(
        ["psql", *emulator_args(emulator), "--", *psql_args],
        path=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    token = (tmp_path / "token").read_text()
    assert result.returncode == 0, (
        result.stderr.replace(token, "<token>") if token else result.stderr
    )
    assert result.stdout.strip() == "postgres|psql"
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == psql_args
    assert token.startswith(f"{emulator.host}:{emulator.port}/?Action=connect&DBUser=postgres&")
    assert not any(token in arg for arg in argv)


@pytest.mark.skipif(PSQL is None, reason="needs the psql program")
def test_psql_exit_code_is_psqls(emulator: Emulator, tmp_path: Path) -> None:
    """psql's options need no --; its exit code is iampg psql's: 0, 1, 2 and 3."""
    ok = run_cli(["psql", *emulator_args(emulator), "-XtAc", "select current_user"])
    assert (ok.returncode, ok.stdout) == (0, "postgres\n"), ok.stderr
    error = run_cli(["psql", *emulator_args(emulator), "-X", "-c", "select 1/0"])
    assert error.returncode == 1
    assert "division by zero" in error.stderr
    script = tmp_path / "script.sql"
    script.write_text("select 1/0;\nselect 2;\n")
    failed = run_cli(
        ["psql", *emulator_args(emulator), "-X", "-v", "ON_ERROR_STOP=1", "-f", str(script)]
    )
    assert failed.returncode == 3
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    args = emulator_args(emulator)
    args[args.index("--port") + 1] = str(port)
    refused = run_cli(["psql", *args, "-X", "-c", "select 1"])
    assert refused.returncode == 2
    assert "refused" in refused.stderr


def test_psql_usage_error_is_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad endpoint stops iampg psql before psql starts: exit 2."""
    assert main(["psql", HOST, "-U", "app", "-p", "0", "-c", "select 1"]) == 2
    assert capsys.readouterr().err.startswith("iampg psql: port must be")


def test_psql_missing_is_exit_127(tmp_path: Path) -> None:
    """No psql on PATH: exit 127 and a message saying how to install it; nothing signed."""
    result = run_cli(["psql", HOST, "-U", "app"], path=str(tmp_path))
    assert result.returncode == 127
    assert "psql not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_ctrl_c_exits_130_without_traceback() -> None:
    """SIGINT while doctor waits on a silent server: exit 130, one line, no traceback."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        args = ["doctor", HOST, "-U", "app", "-p", str(port), "--hostaddr", "127.0.0.1"]
        # As a terminal's Ctrl-C finds it: SIGINT raises KeyboardInterrupt in the child even
        # where the suite runs with SIGINT ignored (a background job: the child inherits that).
        launch = (
            "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv[0] = 'iampg'; runpy.run_module('iampg.cli', run_name='__main__')"
        )
        with subprocess.Popen(
            [sys.executable, "-c", launch, *args, "--timeout", "30"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:  # ends when doctor reaches the TLS check (or exits)
                if line.startswith("PASS  tcp"):
                    break
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert "interrupted" in err


def test_doctor_takes_a_preset_in_any_spelling(
    capsys: pytest.CaptureFixture[str], emulator: Emulator
) -> None:
    """doctor --preset reaches the connection: accepted spellings pass, a mismatch is exit 2."""
    args = ["doctor", *emulator_args(emulator), "--timeout", "5"]
    assert main([*args, "--preset", "Aurora_Express"]) == 0, capsys.readouterr().out
    capsys.readouterr()
    assert main([*args, "--preset", "dsql"]) == 2
    assert "'dsql' does not fit a rds endpoint" in capsys.readouterr().err
    assert main([*args, "--preset", "serverless"]) == 2
    assert "unknown preset 'serverless'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["token", "url", "env"])
def test_allow_insecure_lets_a_plaintext_sslmode_through(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """--sslmode disable is refused towards a remote host unless --allow-insecure is given."""
    args = [command, HOST, "-U", "app", "--sslmode", "disable"]
    assert main(args) == 2
    assert "--allow-insecure" in capsys.readouterr().err
    assert main([*args, "--allow-insecure"]) == 0
    assert capsys.readouterr().out
