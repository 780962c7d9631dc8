"""A pytest guard failing any test whose logs, reprs, errors or output show a minted token.

Checked for every test: log records at DEBUG and above (message and exception; the
emulator's and the proxy's session logs included), the repr and
str of every provider that minted a token and of its endpoint, the text of an exception that
escapes the test, what ``iampg`` commands write to stdout and stderr (stdout may carry the
token only for the commands asked to print it: ``token``, ``url``, ``env``), and any output the
test left captured (a child process's included).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from collections.abc import Generator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from iampg import TokenProvider, cli

__all__ = ["PRINTS_TOKEN", "SENTINEL_PASSWORD", "SecretGuard", "secret_guard"]

#: A password tests may use; it must never show up in a log record, repr or error.
SENTINEL_PASSWORD = "sentinel-pw-7c1e9d"

_GUARD_KEY = pytest.StashKey["SecretGuard"]()

#: The commands whose standard output is the credential itself.
PRINTS_TOKEN = frozenset({"token", "url", "env"})


# Tests with made-up signers hand out short stand-ins ("token-1-app", hypothesis text): only
# something long enough to be a real token is a secret, or the check would flag any "0".
_MIN_SECRET = 40


def secrets_of(token: str) -> list[str]:
    """Return the token and its SigV4 signature: the strings that must not leak."""
    if len(token) < _MIN_SECRET and "X-Amz-Signature=" not in token:
        return []
    found = [token]
    query = parse_qs(urlsplit("//" + token).query)
    found.extend(value for value in query.get("X-Amz-Signature", []) if len(value) >= 16)
    return found


class _Recorder(logging.Handler):
    """Keep every record, at every level, for the check at teardown."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class SecretGuard:
    """What one test minted and logged, and the check that nothing secret leaked."""

    def __init__(self) -> None:
        self.secrets: set[str] = {SENTINEL_PASSWORD}
        self.recorder = _Recorder()
        self._objects: dict[int, object] = {}  # strong refs, for this test only
        self.output_leaks: list[str] = []

    def saw_token(self, token: str, provider: TokenProvider) -> None:
        """Remember a token the code under test minted, and the provider that minted it."""
        self.secrets.update(secrets_of(token))
        self._objects[id(provider)] = provider
        self._objects[id(provider.endpoint)] = provider.endpoint

    def add_secret(self, secret: str) -> None:
        """Remember another string that must not leak (a password, a key)."""
        self.secrets.add(secret)

    def leaks_in(self, text: str) -> bool:
        """Tell whether ``text`` contains any remembered secret."""
        return any(secret in text for secret in self.secrets)

    def leaks(self) -> list[str]:
        """Describe every leak found in the records and reprs, without quoting the secret."""
        found: list[str] = []
        for record in self.recorder.records:
            try:
                message = record.getMessage()
            except Exception:
                message = str(record.msg)
            texts = [message]
            if record.exc_info and record.exc_info[1] is not None:
                texts.extend(exception_texts(record.exc_info[1]))
            if any(self.leaks_in(text) for text in texts):
                found.append(f"log record from {record.name} ({record.pathname}:{record.lineno})")
        found.extend(
            f"repr of a {type(obj).__name__}"
            for obj in self._objects.values()
            if self.leaks_in(repr(obj)) or self.leaks_in(str(obj))
        )
        found.extend(self.output_leaks)
        return found

    def check_command(self, command: str, stdout: str, stderr: str) -> None:
        """Remember a leak in what ``iampg <command>`` printed."""
        if self.leaks_in(stderr):
            self.output_leaks.append(f"stderr of iampg {command}")
        if command not in PRINTS_TOKEN and self.leaks_in(stdout):
            self.output_leaks.append(f"stdout of iampg {command}")


def exception_texts(exc: BaseException) -> list[str]:
    """Return str and repr of an exception and of every exception chained to it (bounded)."""
    texts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 50:
        seen.add(id(current))
        texts.extend((str(current), repr(current)))
        current = current.__cause__ or current.__context__
    return texts


@pytest.fixture(autouse=True)
def secret_guard(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SecretGuard]:
    """Record every token minted and every log record; fail the test if a secret leaked."""
    guard = SecretGuard()
    request.node.stash[_GUARD_KEY] = guard
    original = TokenProvider._refresh

    def recording(self: TokenProvider, *, background: bool = False) -> str:
        token = original(self, background=background)
        guard.saw_token(token, self)
        return token

    monkeypatch.setattr(TokenProvider, "_refresh", recording)
    run = cli._run

    def watched(func: Any, args: argparse.Namespace) -> int:
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                return run(func, args)
        finally:
            guard.check_command(str(args.command), out.getvalue(), err.getvalue())
            sys.stdout.write(out.getvalue())  # pass it on, for the test to read
            sys.stderr.write(err.getvalue())

    monkeypatch.setattr(cli, "_run", watched)
    root = logging.getLogger()
    level = root.level
    root.addHandler(guard.recorder)
    root.setLevel(logging.DEBUG)
    try:
        yield guard
    finally:
        root.removeHandler(guard.recorder)
        root.setLevel(level)
    leaks = guard.leaks()
    if leaks:
        pytest.fail("a secret leaked into: " + "; ".join(sorted(set(leaks))), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Fail a test whose raised exception (expected or not) carries a secret in its text."""
    report = yield
    guard = item.stash.get(_GUARD_KEY, None)
    if guard is None:
        return report
    for title, content in report.sections:
        if guard.leaks_in(content):
            report.outcome = "failed"
            report.longrepr = f"a secret leaked into {title.lower()} (not shown)"
            # the report would print the section: blank it
            report.sections = [(t, c) for t, c in report.sections if t != title]
            return report
    if call.excinfo is not None and any(
        guard.leaks_in(text) for text in exception_texts(call.excinfo.value)
    ):
        report.outcome = "failed"
        report.longrepr = f"a secret leaked into a {call.excinfo.typename} message (not shown)"
    return report
