"""The iampg command: tokens on stdout, clear errors on stderr, meaningful exit codes."""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import unquote, urlsplit

import pytest
from psycopg.conninfo import conninfo_to_dict

from iampg.cli import main

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
    params = conninfo_to_dict(parser["alembic"]["sqlalchemy.url"])
    assert params["user"] == "app"
    assert str(params["password"]).startswith(f"{HOST}:5432/?Action=connect&DBUser=app&")


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
    assert result.stdout == f"{HOST}|shop|require"
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
