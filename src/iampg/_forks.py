"""Pools are never shared across a fork: where a pool was opened, and the refusal after a fork."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

from iampg.errors import ConfigurationError

__all__ = ["Opened"]

_forks = [0]  # how many forks separate this process from the one that imported iampg
# Open psycopg pools (Opened.guard), whose getconn() a child process replaces with a refusal.
_guarded: weakref.WeakSet[Any] = weakref.WeakSet()


def _forked() -> None:
    _forks[0] += 1
    for pool in list(_guarded):
        opened = getattr(pool, "_iampg_opened", None)
        if opened is not None and opened.inherited():
            pool.getconn = _refusing(opened, pool)


def _refusing(opened: Opened, pool: object) -> Callable[..., Any]:
    """Return a ``getconn`` that refuses, for a pool inherited across a fork."""

    def getconn(timeout: float | None = None) -> Any:  # noqa: ARG001 -- getconn's signature
        opened.refuse(pool, "use")
        raise AssertionError("unreachable: the pool was inherited")  # pragma: no cover

    return getconn


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forked)


class Opened:
    """Where a pool was opened: the fork generation and process id, to refuse it after a fork."""

    __slots__ = ("generation", "pid")

    def __init__(self) -> None:
        self.generation = _forks[0]
        self.pid = os.getpid()

    def guard(self, pool: object) -> None:
        """Have ``getconn()`` refuse in a child process, at the fork rather than at each call.

        A check in an overridden ``getconn()`` cost every checkout about 3,200 instructions
        (an extra frame and a ``super()`` call), 1.6 % of a checkout and ``SELECT 1``: the
        child gets an instance attribute that refuses instead, and the parent pays nothing.
        """
        _guarded.add(pool)

    def inherited(self) -> bool:
        """Tell whether the pool was opened in a parent of this process (before a fork)."""
        return self.generation != _forks[0]

    def refuse(self, pool: object, action: str, *, reopenable: bool = True) -> None:
        """Raise if the pool was opened before a fork; say where to open pools instead.

        Raises:
            ConfigurationError: The pool was opened in a parent process.
        """
        if self.inherited():
            name = type(pool).__name__
            raise ConfigurationError(
                f"cannot {action} this {name} in process {os.getpid()}: it was opened in "
                f"process {self.pid} before a fork, and its connections belong to that "
                f"process (sharing them would mix both processes' queries on one session). "
                f"Create or open the pool after the fork, in each process: gunicorn's "
                f"post_fork hook (or no --preload), uWSGI's lazy-apps, Celery's "
                f"worker_process_init signal"
                + (
                    "; a pool made with open=False before the fork may be opened in the child"
                    if reopenable
                    else ""
                )
            )
