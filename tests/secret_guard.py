"""A pytest guard failing any test whose logs, reprs or errors show a minted token or secret."""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from iampg import TokenProvider

__all__ = ["SENTINEL_PASSWORD", "SecretGuard", "secret_guard"]

#: A password tests may use; it must never show up in a log record, repr or error.
SENTINEL_PASSWORD = "sentinel-pw-7c1e9d"

_GUARD_KEY = pytest.StashKey["SecretGuard"]()


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
        return found


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
    if guard is None or call.excinfo is None:
        return report
    if any(guard.leaks_in(text) for text in exception_texts(call.excinfo.value)):
        report.outcome = "failed"
        report.longrepr = f"a secret leaked into a {call.excinfo.typename} message (not shown)"
    return report
