"""Settings are named as the caller writes them: Python keywords, or iampg options."""

from __future__ import annotations

import contextvars
import threading

from iampg._options import cli_spelling, option, options, using_cli


def test_python_spelling_by_default() -> None:
    """Outside the command, settings read as keyword arguments, quoted by kind."""
    assert not using_cli()
    assert option("region", "us-east-1") == "region='us-east-1'"
    assert option("region") == "region=..."
    assert option("port", "5432") == "port=5432"
    assert option("allow_insecure") == "allow_insecure=True"
    assert option("session") == "session=..."
    assert option("profile") == "profile=... (or AWS_PROFILE)"
    assert options("session", "profile", "aws_access_key_id") == (
        "session=..., profile=... or aws_access_key_id=..."
    )


def test_cli_spelling_names_flags_and_variables() -> None:
    """Inside the command, settings read as options with their environment variable."""
    with cli_spelling():
        assert using_cli()
        assert option("region", "us-east-1") == "--region us-east-1 (or AWS_REGION)"
        assert option("host") == "--host (or PGHOST)"
        assert option("allow_insecure") == "--allow-insecure"
        assert option("preset", "dsql") == "--preset dsql"
        assert option("aws_access_key_id") == "AWS_ACCESS_KEY_ID"
        assert option("some_new_thing", "x") == "--some-new-thing x"
        assert options("session", "profile", "aws_access_key_id") == "--profile (or AWS_PROFILE)"
        assert options("region", "host") == "--region (or AWS_REGION) or --host (or PGHOST)"
    assert not using_cli()


def test_spelling_is_per_context() -> None:
    """Another thread (say, a library user's) keeps the Python spelling while the CLI runs."""
    seen: list[str] = []
    with cli_spelling():
        thread = threading.Thread(target=lambda: seen.append(option("region", "x")))
        thread.start()
        thread.join()
        copied = contextvars.copy_context().run(option, "region", "x")
    assert seen == ["region='x'"]
    assert copied == "--region x (or AWS_REGION)"
