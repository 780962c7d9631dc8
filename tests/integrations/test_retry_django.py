"""Django's retry_transaction: real conflicts and lost connections behind Django's errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypedDict

import pytest

django = pytest.importorskip("django")

from django.db import connections, transaction  # noqa: E402
from django.db import utils as db_utils  # noqa: E402

import iampg  # noqa: E402
from iampg import TokenProvider  # noqa: E402
from iampg.emulator import Emulator  # noqa: E402
from iampg.integrations.django import database, retry_transaction  # noqa: E402
from support import ContendedCounter, endpoint_for, terminate_backend  # noqa: E402

TABLE = "iampg_retry_django"
ALIAS = "iampg_retry"


class Backoff(TypedDict):
    base: float
    cap: float


FAST: Backoff = {"base": 0.001, "cap": 0.01}


pytestmark = pytest.mark.usefixtures("django_configured")


@pytest.fixture
def counter(emulator: Emulator) -> ContendedCounter:
    """A fresh one-row counter table behind the emulator."""
    return ContendedCounter(endpoint_for(emulator), TABLE)


@pytest.fixture(params=[False, True], ids=["unpooled", "native-pool"])
def alias(request: pytest.FixtureRequest, counter: ContendedCounter) -> Iterator[str]:
    """Install a DATABASES entry made by database() as django.db.connections[ALIAS]."""
    pool: Any = {"min_size": 1, "max_size": 2, "timeout": 5.0} if request.param else False
    entry = database(TokenProvider(counter.endpoint), pool=pool)
    wrapper = db_utils.ConnectionHandler({"default": entry})["default"]
    connections[ALIAS] = wrapper
    yield ALIAS
    wrapper.close()
    wrapper.close_pool()
    del connections[ALIAS]


def _query(sql: str, params: tuple[Any, ...] = ()) -> Any:
    with connections[ALIAS].cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0] if cur.description else None


class Increment:
    """Read the counter and write it back plus one; the first run is raced by a commit."""

    def __init__(self, counter: ContendedCounter) -> None:
        self.counter = counter
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        _query("set transaction isolation level repeatable read")
        n = int(_query(f"select n from {TABLE} where id = 1"))
        if self.calls == 1:  # another transaction commits in between: ours must conflict
            self.counter.bump_elsewhere()
        _query(f"update {TABLE} set n = %s where id = 1", (n + 1,))
        return n + 1


def test_serialization_failure_runs_again(alias: str, counter: ContendedCounter) -> None:
    """A real 40001 behind Django's OperationalError is retried in a new atomic block."""
    work = Increment(counter)
    assert retry_transaction(work, using=alias, **FAST) == 101
    assert work.calls == 2
    assert counter.value() == 101


def test_without_retry_the_conflict_surfaces(alias: str, counter: ContendedCounter) -> None:
    """Control: the same work in a plain atomic block fails with Django's OperationalError."""
    with pytest.raises(db_utils.OperationalError) as info, transaction.atomic(using=alias):
        Increment(counter)()
    assert getattr(info.value.__cause__, "sqlstate", None) == "40001"


def test_decorator_keeps_the_function_arguments(alias: str, counter: ContendedCounter) -> None:
    """@retry_transaction(using=...) retries the decorated function with its arguments."""
    work = Increment(counter)

    @retry_transaction(using=alias, **FAST)
    def increment_by(extra: int) -> int:
        return work() + extra

    assert increment_by(1000) == 1101
    assert increment_by.__name__ == "increment_by"
    assert work.calls == 2


@pytest.mark.parametrize("sqlstate", ["OC000", "OC001"])
def test_dsql_codes_are_retried_until_attempts_run_out(alias: str, sqlstate: str) -> None:
    """DSQL's codes (raised here by PL/pgSQL) are retried; Django's error surfaces last."""
    calls = 0

    def conflict() -> None:
        nonlocal calls
        calls += 1
        _query(f"do $$ begin raise exception 'x' using errcode = '{sqlstate}'; end $$")

    with pytest.raises(db_utils.DatabaseError) as info:
        retry_transaction(conflict, using=alias, attempts=3, **FAST)
    assert getattr(info.value.__cause__, "sqlstate", None) == sqlstate
    assert calls == 3


@pytest.mark.parametrize("cut", ["terminated", "abrupt"])
def test_connection_lost_before_commit_runs_again(
    emulator: Emulator, counter: ContendedCounter, alias: str, cut: str
) -> None:
    """A connection terminated (57P01) or cut without a word before COMMIT is replaced."""
    pids: list[int] = []

    def work() -> int:
        pid = int(_query("select pg_backend_pid()"))
        pids.append(pid)
        if len(pids) == 1:
            if cut == "terminated":
                terminate_backend(counter.endpoint, pid)
            else:
                emulator.pause()
                emulator.resume()
        return int(_query("select 7"))

    assert retry_transaction(work, using=alias, **FAST) == 7
    assert len(pids) == 2
    assert pids[0] != pids[1]


def test_other_errors_are_not_retried(alias: str) -> None:
    """A division by zero surfaces on the first attempt."""
    calls = 0

    def broken() -> None:
        nonlocal calls
        calls += 1
        _query("select 1/0")

    with pytest.raises(db_utils.DataError):
        retry_transaction(broken, using=alias, **FAST)
    assert calls == 1


def test_inside_an_atomic_block_is_refused(alias: str) -> None:
    """A retried transaction must be its own: inside another atomic block Django refuses it."""
    with transaction.atomic(using=alias), pytest.raises(RuntimeError, match="durable"):
        retry_transaction(lambda: None, using=alias)


def test_bad_settings_are_refused() -> None:
    """attempts below 1 is a configuration error, raised before any transaction."""
    with pytest.raises(iampg.ConfigurationError, match="attempts"):
        retry_transaction(attempts=0)
