"""Pools are never shared across a fork: where a pool was opened, and the refusal after a fork."""

from __future__ import annotations

import os

from iampg.errors import ConfigurationError

__all__ = ["Opened"]

_forks = [0]  # how many forks separate this process from the one that imported iampg


def _forked() -> None:
    _forks[0] += 1


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forked)


class Opened:
    """Where a pool was opened: the fork generation and process id, to refuse it after a fork."""

    __slots__ = ("generation", "pid")

    def __init__(self) -> None:
        self.generation = _forks[0]
        self.pid = os.getpid()

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
