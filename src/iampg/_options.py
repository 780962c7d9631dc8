"""Name a setting the way the current caller writes it: a Python keyword or an ``iampg`` option.

Error messages tell the user what to pass. From Python that is a keyword argument
(``region='us-east-1'``); while the ``iampg`` command runs it is an option or an environment
variable (``--region us-east-1 (or AWS_REGION)``). :func:`option` renders either, depending on
who is calling; the command switches it on with :func:`cli_spelling` for its whole run.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["cli_spelling", "option", "options", "using_cli"]

_CLI: contextvars.ContextVar[bool] = contextvars.ContextVar("iampg_cli_spelling", default=False)


@dataclass(frozen=True)
class _Setting:
    """How a setting is given on the command line and in the environment."""

    flag: str | None  # the ``iampg`` option; None when the command has none
    env: str | None = None  # the environment variable that gives it, if any
    kind: Literal["text", "number", "switch"] = "text"
    always_read: bool = False  # the variable applies from Python too (botocore reads it)


# Every setting an ``iampg`` message may name. A name missing here is spelled the usual way
# (``--name-with-dashes``), with no environment variable.
_SETTINGS: dict[str, _Setting] = {
    "host": _Setting("--host", "PGHOST"),
    "port": _Setting("--port", "PGPORT", "number"),
    "user": _Setting("--user", "PGUSER"),
    "dbname": _Setting("--dbname", "PGDATABASE"),
    "hostaddr": _Setting("--hostaddr", "PGHOSTADDR"),
    "region": _Setting("--region", "AWS_REGION"),
    "kind": _Setting("--kind"),
    "sslmode": _Setting("--sslmode", "PGSSLMODE"),
    "sslrootcert": _Setting("--sslrootcert", "PGSSLROOTCERT"),
    "profile": _Setting("--profile", "AWS_PROFILE", always_read=True),
    "preset": _Setting("--preset"),
    "allow_insecure": _Setting("--allow-insecure", kind="switch"),
    "timeout": _Setting("--timeout", kind="number"),
    "connect_timeout": _Setting("--timeout", kind="number"),
    # Python only: the command signs with the default credential chain or --profile.
    "session": _Setting(None),
    "aws_access_key_id": _Setting(None, "AWS_ACCESS_KEY_ID"),
    "aws_secret_access_key": _Setting(None, "AWS_SECRET_ACCESS_KEY"),
    "aws_session_token": _Setting(None, "AWS_SESSION_TOKEN"),
}


def using_cli() -> bool:
    """Tell whether messages are being written for the ``iampg`` command."""
    return _CLI.get()


@contextlib.contextmanager
def cli_spelling() -> Iterator[None]:
    """Spell settings as ``iampg`` options (and environment variables) inside the block."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def option(name: str, example: str | None = None) -> str:
    """Return setting ``name`` as the current caller writes it, with ``example`` as its value.

    From Python: ``region='us-east-1'`` (``region=...`` without an example, ``port=5432``
    for numbers, ``allow_insecure=True`` for switches; ``profile=... (or AWS_PROFILE)``
    where botocore reads the variable anyway). While the ``iampg`` command runs:
    ``--region us-east-1 (or AWS_REGION)`` (``--region (or AWS_REGION)`` without an example,
    ``--allow-insecure`` for switches), or only the environment variable for settings the
    command has no option for (``AWS_ACCESS_KEY_ID``).

    Args:
        name: The Python keyword (``region``, ``allow_insecure``...).
        example: A value to show, as the user would type it; ``None`` for none.
    """
    return _render(name, example, variable=True)


def _render(name: str, example: str | None, *, variable: bool) -> str:
    setting = _SETTINGS.get(name, _Setting("--" + name.replace("_", "-")))
    if not _CLI.get():
        if setting.kind == "switch":
            return f"{name}=True"
        text = f"{name}=..." if example is None else f"{name}={_literal(setting, example)}"
        return f"{text} (or {setting.env})" if variable and setting.always_read else text
    if setting.flag is None:
        return setting.env or name
    text = setting.flag
    if example is not None and setting.kind != "switch":
        text += f" {example}"
    if setting.env:
        text += f" (or {setting.env})"
    return text


def _literal(setting: _Setting, example: str) -> str:
    return example if setting.kind == "number" else repr(example)


def options(*names: str) -> str:
    """Return the settings the current caller can pass, as "a, b or c".

    Settings the ``iampg`` command has no option for (``session``, ``aws_access_key_id``)
    are left out while it runs; each is rendered by :func:`option` without an example (and,
    from Python, without an environment variable).
    """
    shown = [
        _render(name, None, variable=_CLI.get())
        for name in names
        if not _CLI.get() or _SETTINGS.get(name, _Setting("--")).flag is not None
    ]
    if len(shown) <= 1:
        return "".join(shown)
    return f"{', '.join(shown[:-1])} or {shown[-1]}"
