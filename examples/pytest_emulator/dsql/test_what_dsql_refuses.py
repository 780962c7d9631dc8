"""What Aurora DSQL refuses, refused by the emulator with DSQL's SQLSTATE and message."""

import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

import iampg

pytestmark = pytest.mark.usefixtures("iampg_aws_env")  # the emulator's fake keys only


@pytest.fixture
def table(iampg_endpoint: iampg.Endpoint) -> Iterator[str]:
    """A fresh table with one row, made and dropped in transactions of their own."""
    name = f"items_{uuid.uuid4().hex[:8]}"
    with iampg.connect(iampg_endpoint, autocommit=True) as conn:
        conn.execute(f"create table {name} (id int primary key, n int)")
        conn.execute(f"insert into {name} values (1, 0)")
    yield name
    with iampg.connect(iampg_endpoint, autocommit=True) as conn:
        conn.execute(f"drop table {name}")


def refusal(endpoint: iampg.Endpoint, *statements: str) -> tuple[str | None, str | None]:
    """Run the statements in one transaction; return the SQLSTATE and message it fails with."""
    *before, last = statements
    with iampg.connect(endpoint) as conn:
        for statement in before:
            conn.execute(statement)
        with pytest.raises(psycopg.Error) as info:
            conn.execute(last)
    return info.value.sqlstate, info.value.diag.message_primary


def test_savepoint(iampg_endpoint: iampg.Endpoint) -> None:
    """SAVEPOINT (and RELEASE, ROLLBACK TO): nested transactions do not exist."""
    assert refusal(iampg_endpoint, "savepoint s1") == ("0A000", "SAVEPOINT not supported")


def test_foreign_key(iampg_endpoint: iampg.Endpoint, table: str) -> None:
    """Foreign keys, in CREATE TABLE as in ALTER TABLE."""
    statement = f"create table {table}_child (id int primary key, p int references {table})"
    assert refusal(iampg_endpoint, statement) == ("0A000", "FOREIGN KEY constraint not supported")


def test_trigger(iampg_endpoint: iampg.Endpoint, table: str) -> None:
    """Triggers."""
    statement = f"create trigger t before insert on {table} execute function f()"
    assert refusal(iampg_endpoint, statement) == ("0A000", "CREATE TRIGGER not supported")


def test_temporary_table(iampg_endpoint: iampg.Endpoint) -> None:
    """Temporary tables."""
    statement = "create temporary table scratch (id int)"
    assert refusal(iampg_endpoint, statement) == ("0A000", "temporary tables not supported")


def test_truncate(iampg_endpoint: iampg.Endpoint, table: str) -> None:
    """TRUNCATE: delete the rows instead, in batches under the row limit."""
    assert refusal(iampg_endpoint, f"truncate {table}") == ("0A000", "TRUNCATE not supported")


def test_listen(iampg_endpoint: iampg.Endpoint) -> None:
    """LISTEN and NOTIFY."""
    assert refusal(iampg_endpoint, "listen jobs") == ("0A000", "LISTEN not supported")


def test_extension(iampg_endpoint: iampg.Endpoint) -> None:
    """Extensions."""
    statement = "create extension if not exists pgcrypto"
    assert refusal(iampg_endpoint, statement) == ("0A000", "CREATE EXTENSION not supported")


def test_serial(iampg_endpoint: iampg.Endpoint) -> None:
    """SERIAL types: use uuid keys, identity columns or a sequence with CACHE."""
    statement = "create table counters (id serial primary key)"
    assert refusal(iampg_endpoint, statement) == ("42704", 'type "serial" does not exist')


def test_one_ddl_statement_per_transaction(iampg_endpoint: iampg.Endpoint) -> None:
    """One DDL statement per transaction."""
    statements = ("create table one (id int primary key)", "create table two (id int primary key)")
    assert refusal(iampg_endpoint, *statements) == (
        "0A000",
        "multiple ddl statements not supported in a transaction",
    )


def test_ddl_and_dml_apart(iampg_endpoint: iampg.Endpoint, table: str) -> None:
    """DDL and DML never in the same transaction."""
    statements = (f"insert into {table} values (2, 0)", f"alter table {table} add column note text")
    assert refusal(iampg_endpoint, *statements) == (
        "0A000",
        "ddl and dml are not supported in the same transaction",
    )


def test_row_limit(iampg_endpoint: iampg.Endpoint, table: str) -> None:
    """At most 3,000 modified rows per transaction."""
    insert = f"insert into {table} select g, 0 from generate_series(2, 3002) g"  # 3,001 rows
    assert refusal(iampg_endpoint, insert, "select 1") == (
        "54000",
        "transaction row limit exceeded",
    )


def test_second_writer_conflicts(iampg_endpoint: iampg.Endpoint, table: str) -> None:
    """Two transactions write one row: neither waits, the second gets DSQL's OC000."""
    with iampg.connect(iampg_endpoint) as first:
        first.execute(f"update {table} set n = 1 where id = 1")
        assert refusal(iampg_endpoint, f"update {table} set n = 2 where id = 1") == (
            "40001",
            "change conflicts with another transaction, please retry: (OC000)",
        )


def test_forced_conflict_at_commit(
    iampg_endpoint: iampg.Endpoint, iampg_force_conflict: Callable[..., None], table: str
) -> None:
    """Make the next commit lose a race, to see that the code runs its transaction again."""
    attempts = []

    def increment(conn: psycopg.Connection) -> None:
        attempts.append(1)
        conn.execute(f"update {table} set n = n + 1 where id = 1")

    iampg_force_conflict()  # any session's next COMMIT
    with iampg.ConnectionPool(iampg_endpoint, min_size=1, max_size=1) as pool:
        iampg.retry_transaction(pool, increment, base=0.001)
    assert len(attempts) == 2


def test_custom_role_needs_aws_iam_grant(
    iampg_endpoint: iampg.Endpoint, iampg_map_role: Callable[..., None]
) -> None:
    """A role logs in once the admin ran AWS IAM GRANT <role> TO '<your principal>'."""
    reader = iampg_endpoint.replace(user="reader")
    iampg_map_role("reader")
    with iampg.connect(reader) as conn:
        assert conn.execute("select current_user").fetchone() == ("reader",)
