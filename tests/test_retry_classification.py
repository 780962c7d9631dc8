"""Conflicts and lost connections recognised inside any driver's or ORM's wrapper."""

from __future__ import annotations

import pytest

import iampg
from iampg._retry import conflict_sqlstate, is_connection_lost, retry_reason


class DriverError(Exception):
    """An error as a driver raises it: psycopg and asyncpg say ``sqlstate``."""

    def __init__(self, sqlstate: str | None) -> None:
        super().__init__("driver error")
        self.sqlstate = sqlstate


class Psycopg2Error(Exception):
    """psycopg2 says ``pgcode``."""

    def __init__(self, pgcode: str) -> None:
        super().__init__("psycopg2 error")
        self.pgcode = pgcode


class OrmError(Exception):
    """SQLAlchemy keeps the driver's error as ``orig``; ``connection_invalidated`` on a cut."""

    def __init__(self, orig: BaseException | None, *, invalidated: bool = False) -> None:
        super().__init__("orm error")
        self.orig = orig
        self.connection_invalidated = invalidated


def _raised_from(cause: BaseException) -> Exception:
    """Return an error raised ``from cause``, as Django re-raises a driver's error."""
    error = RuntimeError("wrapper")
    error.__cause__ = cause  # what `raise error from cause` sets
    error.__suppress_context__ = True
    return error


def _raised_during(context: BaseException, *, suppress: bool = False) -> Exception:
    """Return an error raised while handling ``context`` (``from None`` if ``suppress``)."""
    try:
        try:
            raise context
        except type(context):
            if suppress:
                raise RuntimeError("replaced") from None
            raise RuntimeError("during handling")  # noqa: B904 -- the context is the point
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize(
    "error",
    [
        DriverError("OC000"),
        Psycopg2Error("OC001"),
        Exception({"S": "ERROR", "C": "40001", "M": "could not serialize"}),  # pg8000
        OrmError(DriverError("40001")),
        _raised_from(DriverError("OC000")),
        OrmError(_raised_from(Psycopg2Error("40001"))),
    ],
    ids=["psycopg", "psycopg2", "pg8000", "sqlalchemy", "django", "nested"],
)
def test_conflicts_are_found_through_wrappers(error: Exception) -> None:
    """OC000/OC001/40001 are found on the error, its orig, its cause, in any nesting."""
    assert conflict_sqlstate(error) in {"OC000", "OC001", "40001"}


def test_a_suppressed_context_does_not_count() -> None:
    """`raise ... from None` hides the conflict, as it hides it from a traceback."""
    assert conflict_sqlstate(_raised_during(DriverError("40001"), suppress=True)) is None


def test_other_codes_are_not_conflicts() -> None:
    """A unique violation or an error with no code is not a conflict."""
    assert conflict_sqlstate(OrmError(DriverError("23505"))) is None
    assert conflict_sqlstate(ValueError("x")) is None


@pytest.mark.parametrize(
    "error",
    [
        DriverError("57P01"),  # terminated by an administrator
        OrmError(DriverError(None), invalidated=True),  # SQLAlchemy saw the cut
        _raised_from(DriverError("08006")),
        ConnectionResetError(),
    ],
    ids=["admin-shutdown", "invalidated", "class-08", "socket"],
)
def test_lost_connections_are_found_through_wrappers(error: Exception) -> None:
    """A lost connection is recognised by its SQLSTATE, SQLAlchemy's flag or the socket error."""
    assert is_connection_lost(error)


def test_lost_is_retried_only_when_replaceable_and_before_commit() -> None:
    """A lost connection runs again on a replaceable bind, before COMMIT or if idempotent."""
    lost = DriverError("57P01")

    def reason(*, replaceable: bool, committing: bool, idempotent: bool) -> str | None:
        return retry_reason(
            lost,
            broken=False,
            replaceable=replaceable,
            committing=committing,
            idempotent=idempotent,
        )

    assert reason(replaceable=True, committing=False, idempotent=False) == "connection lost"
    assert reason(replaceable=False, committing=False, idempotent=False) is None
    assert reason(replaceable=True, committing=True, idempotent=False) is None
    assert reason(replaceable=True, committing=True, idempotent=True) == (
        "connection lost during COMMIT"
    )


def test_iampg_verdicts_are_never_retried() -> None:
    """An iampg error in the chain (a refused token) stops the retries, whatever else it holds."""
    refused = OrmError(_raised_from(iampg.AuthenticationError("refused")))
    refused.connection_invalidated = True
    assert (
        retry_reason(refused, broken=True, replaceable=True, committing=False, idempotent=True)
        is None
    )


def test_cycles_end() -> None:
    """An error chain that loops back on itself is walked once."""
    first = DriverError(None)
    second = OrmError(first)
    first.__cause__ = second
    assert not is_connection_lost(second)
