"""The iampg command's messages name its options and environment variables, not Python keywords."""

from __future__ import annotations

import os
import re

import pytest

from iampg.cli import main

HOST = "mydb.cluster-abc.us-east-1.rds.amazonaws.com"
COMMANDS = ["token", "url", "env", "psql", "doctor"]

# What a Python caller would write; never right in the command's output.
PYTHON_FORMS = re.compile(r"\b\w+=True\b|\bsession=|\bprofile=|\b\w+='|\b\w+=\.\.\.")

# (arguments, extra environment, what the message must name)
MISTAKES = [
    pytest.param([], {}, ["--host", "PGHOST"], id="no-host"),
    pytest.param(["db.internal", "-U", "app"], {}, ["--region", "AWS_REGION"], id="no-region"),
    pytest.param([HOST], {}, ["--user", "PGUSER"], id="no-user"),
    pytest.param([HOST, "-U", "app", "-r", "eu-west-1"], {}, ["--region"], id="contradiction"),
    pytest.param(
        ["abcdefghijklmnopqrstuvwxyz", "--kind", "dsql"], {}, ["--region"], id="dsql-cluster-id"
    ),
    pytest.param(
        [HOST, "-U", "app", "--sslmode", "disable"], {}, ["--allow-insecure"], id="insecure"
    ),
    pytest.param([HOST, "-U", "app", "--profile", "nosuch"], {}, ["--profile"], id="no-profile"),
    pytest.param(
        [HOST, "-U", "app"],
        {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
        ["AWS_ACCESS_KEY_ID", "AWS_PROFILE"],
        id="no-credentials",
    ),
]


@pytest.fixture
def no_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test instead of replacing it with psql should a case pass validation."""

    def refuse(*args: object) -> None:
        pytest.fail(f"psql was started: {args!r}")

    monkeypatch.setattr(os, "execve", refuse)


@pytest.mark.usefixtures("no_exec")
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("args", "environ", "named"), MISTAKES)
def test_mistakes_are_explained_in_cli_terms(  # noqa: PLR0917 -- fixtures and parameters
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    args: list[str],
    environ: dict[str, str | None],
    named: list[str],
) -> None:
    """Each configuration mistake names the flags and variables to fix it, never a keyword."""
    for name, value in environ.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    extra = ["--timeout", "1"] if command == "doctor" else []
    code = main([command, *args, *extra])
    out, err = capsys.readouterr()
    # doctor reports a failed check on stdout and exits 1; the others print one line on stderr.
    text = out if command == "doctor" else err
    # Credentials that cannot be found are a failure (1); the rest usage errors (2).
    signing = "--profile" in named or "AWS_ACCESS_KEY_ID" in named
    assert code == (1 if command == "doctor" or signing else 2), text
    if command == "doctor":
        text = "\n".join(line for line in out.splitlines() if not line.startswith("PASS"))
    else:
        assert out == ""
        assert err.count("\n") == 1
    for name in named:
        assert name in text, text
    assert not PYTHON_FORMS.search(text.replace("'host=...'", "")), text
