"""DSQL mode's rules: role mapping, the SQL DSQL refuses, limits and optimistic concurrency."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import botocore.session
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql

import iampg
from iampg.emulator import DsqlRules, Emulator
from iampg.emulator import _dsql_sql as dq
from support import endpoint_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    from iampg.emulator import Backend
    from support import EmulatorFactory

ROLE = "iampg_dsql_mapped"
SCHEMA = "iampg_dsql_rules"
DENIED = "FATAL:  unable to accept connection, access denied"
OC000 = "change conflicts with another transaction, please retry: (OC000)"
OC001 = "schema has been updated by another transaction, please retry: (OC001)"

pytestmark = pytest.mark.usefixtures("quiet_botocore")


@pytest.fixture(scope="module")
def roles(backend: Backend) -> None:
    """DSQL's admin, an ordinary role, and a schema of admin's for the tests' tables."""
    backend.ensure_role("admin", superuser=True)  # as the plugin makes it
    backend.ensure_role(ROLE)
    with psycopg.connect(backend.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA} AUTHORIZATION admin")
        conn.execute(f"GRANT USAGE ON SCHEMA {SCHEMA} TO {ROLE}")


@pytest.fixture
def dsql(start_emulator: EmulatorFactory, roles: None) -> Emulator:
    return start_emulator(service="dsql")


def mint(emu: Emulator, *, admin: bool = True) -> str:
    session = botocore.session.get_session()
    creds = emu.credentials
    session.set_credentials(creds.access_key_id, creds.secret_access_key, creds.session_token)
    client = session.create_client("dsql", region_name=emu.region)
    generate = (
        client.generate_db_connect_admin_auth_token
        if admin
        else client.generate_db_connect_auth_token
    )
    token: str = generate(emu.host, emu.region, 900)
    return token


def connect(emu: Emulator, user: str = "admin", **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(
        emu.conninfo(user, password=mint(emu, admin=user == "admin")),
        connect_timeout=5,
        # a bound: without optimistic concurrency a second writer would wait for ever
        options=f"-c search_path={SCHEMA} -c statement_timeout=10s",
        **kwargs,
    )


@pytest.fixture
def admin(dsql: Emulator) -> Iterator[psycopg.Connection[Any]]:
    with connect(dsql, autocommit=True) as conn:
        yield conn


@pytest.fixture
def table(admin: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh table ``(id int primary key, n int)`` with rows 1 and 2."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, n int)")
    admin.execute(f"INSERT INTO {name} VALUES (1, 0), (2, 0)")
    yield name
    admin.execute(f"DROP TABLE IF EXISTS {name}")


def error_of(conn: psycopg.Connection[Any], statement: str, params: Any = None) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(statement, params)
    return info.value


# --- 4. role mapping ---


def test_custom_role_needs_a_mapping_to_the_callers_principal(dsql: Emulator) -> None:
    """Unmapped: access denied naming the principal; granted: in; revoked: denied again."""
    with connect(dsql, autocommit=True) as admin:
        admin.execute(f"AWS IAM REVOKE {ROLE} FROM '{dsql.principal}'")
    with pytest.raises(psycopg.OperationalError) as info:
        connect(dsql, ROLE).close()
    assert DENIED in str(info.value)
    assert f"HINT:  Role {ROLE} is not mapped to IAM principal {dsql.principal}" in str(info.value)
    assert dsql.events[-1].reason == "role not mapped"
    assert dsql.events[-1].sqlstate == "08006"
    with connect(dsql, autocommit=True) as admin:
        admin.execute(f"AWS IAM GRANT {ROLE} TO '{dsql.principal}'")
        rows = admin.execute(
            "SELECT arn, pg_role_name, grantor_pg_role_name FROM sys.iam_pg_role_mappings "
            "WHERE pg_role_name = %s",
            [ROLE],
        ).fetchall()
    assert rows == [(dsql.principal, ROLE, "admin")]
    with connect(dsql, ROLE) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (ROLE,)
    with connect(dsql, autocommit=True) as admin:
        admin.execute(f"AWS IAM REVOKE {ROLE} FROM '{dsql.principal}'")
    with pytest.raises(psycopg.OperationalError):
        connect(dsql, ROLE).close()


def test_mapping_to_another_principal_does_not_let_the_caller_in(dsql: Emulator) -> None:
    other = "arn:aws:iam::123456789012:role/someone-else"
    with connect(dsql, autocommit=True) as admin:
        admin.execute(f"AWS IAM REVOKE {ROLE} FROM '{dsql.principal}'")
        admin.execute(f"AWS IAM GRANT {ROLE} TO '{other}'")
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            connect(dsql, ROLE).close()
        assert DENIED in str(info.value)
    finally:
        with connect(dsql, autocommit=True) as admin:
            admin.execute(f"AWS IAM REVOKE {ROLE} FROM '{other}'")


def test_mapping_persists_in_the_backend(dsql: Emulator, backend: Backend) -> None:
    """The grant is a row of the backend's sys.iam_pg_role_mappings: it outlives the emulator."""
    with connect(dsql, autocommit=True) as admin:
        admin.execute(f"AWS IAM GRANT {ROLE} TO '{dsql.principal}'")
    dsql.stop()
    with psycopg.connect(backend.dsn) as conn:
        found = conn.execute(
            "SELECT count(*) FROM sys.iam_pg_role_mappings WHERE pg_role_name = %s AND arn = %s",
            [ROLE, dsql.principal],
        ).fetchone()
    assert found == (1,)


def test_only_admin_may_grant(dsql: Emulator) -> None:
    with connect(dsql, autocommit=True) as admin:
        admin.execute(f"AWS IAM GRANT {ROLE} TO '{dsql.principal}'")
    with connect(dsql, ROLE, autocommit=True) as conn:
        error = error_of(conn, f"AWS IAM GRANT {ROLE} TO 'arn:aws:iam::1:role/x'")
    assert error.sqlstate == "42501"
    assert error.diag.message_primary == "permission denied to AWS IAM GRANT"


def test_grant_of_a_missing_role_fails(admin: psycopg.Connection[Any], dsql: Emulator) -> None:
    error = error_of(admin, f"AWS IAM GRANT no_such_role TO '{dsql.principal}'")
    assert error.sqlstate == "42704"


def test_mapping_is_not_checked_when_the_rule_is_off(
    start_emulator: EmulatorFactory, roles: None
) -> None:
    emu = start_emulator(service="dsql", dsql_rules=DsqlRules(role_mapping=False))
    with connect(emu, autocommit=True) as admin:
        admin.execute(f"AWS IAM REVOKE {ROLE} FROM '{emu.principal}'")
    with connect(emu, ROLE) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (ROLE,)


# --- 5. the SQL DSQL refuses ---

REFUSED = [
    ("savepoint", "SAVEPOINT s1", "0A000", "SAVEPOINT not supported"),
    ("savepoint", "RELEASE SAVEPOINT s1", "0A000", "SAVEPOINT not supported"),
    ("savepoint", "ROLLBACK TO SAVEPOINT s1", "0A000", "SAVEPOINT not supported"),
    (
        "foreign_keys",
        "CREATE TABLE {t}_c (id int PRIMARY KEY, p int REFERENCES {t} (id))",
        "0A000",
        "FOREIGN KEY constraint not supported",
    ),
    (
        "foreign_keys",
        "ALTER TABLE {t} ADD CONSTRAINT fk FOREIGN KEY (n) REFERENCES {t} (id)",
        "0A000",
        "unsupported ALTER TABLE ADD CONSTRAINT statement",
    ),
    (
        "triggers",
        "CREATE TRIGGER tr BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION f()",
        "0A000",
        "CREATE TRIGGER not supported",
    ),
    (
        "temporary_tables",
        "CREATE TEMPORARY TABLE {t}_tmp (id int)",
        "0A000",
        "temporary tables not supported",
    ),
    (
        "temporary_tables",
        "CREATE TEMP TABLE {t}_tmp (id int)",
        "0A000",
        "temporary tables not supported",
    ),
    ("truncate", "TRUNCATE {t}", "0A000", "TRUNCATE not supported"),
    ("listen_notify", "LISTEN chan", "0A000", "LISTEN not supported"),
    ("listen_notify", "NOTIFY chan", "0A000", "NOTIFY not supported"),
    (
        "extensions",
        "CREATE EXTENSION IF NOT EXISTS plpgsql",
        "0A000",
        "CREATE EXTENSION not supported",
    ),
    (
        "sequences",
        "CREATE TABLE {t}_s (id serial PRIMARY KEY)",
        "42704",
        'type "serial" does not exist',
    ),
    ("sequences", "CREATE TABLE {t}_s (id BIGSERIAL)", "42704", 'type "bigserial" does not exist'),
    (
        "sequences",
        "CREATE SEQUENCE {t}_seq",
        "0A000",
        (
            "CREATE SEQUENCE is not supported without an explicit cache size. "
            "please define CACHE greater than or equal to 65536 or equal to 1"
        ),
    ),
]


@pytest.mark.parametrize(("rule", "statement", "sqlstate", "message"), REFUSED)
@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_dsql_refuses_with_its_text(  # noqa: PLR0917
    admin: psycopg.Connection[Any],
    table: str,
    rule: str,
    statement: str,
    sqlstate: str,
    message: str,
    protocol: str,
) -> None:
    del rule
    text = statement.format(t=table)
    admin.autocommit = False
    if protocol == "simple":
        with pytest.raises(psycopg.Error) as info:
            admin.cursor().execute(text.encode())  # bytes: psycopg sends it as a Query
    else:
        with pytest.raises(psycopg.Error) as info:
            admin.execute(text, prepare=True)
    assert info.value.sqlstate == sqlstate
    assert info.value.diag.message_primary == message
    assert info.value.diag.severity == "ERROR"
    # the transaction is aborted, as after any error
    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
        admin.execute("SELECT 1")
    admin.rollback()


@pytest.mark.parametrize(("rule", "statement", "sqlstate", "message"), REFUSED)
def test_each_refusal_can_be_turned_off(  # noqa: PLR0917
    start_emulator: EmulatorFactory,
    roles: None,
    rule: str,
    statement: str,
    sqlstate: str,
    message: str,
) -> None:
    """With the rule off, PostgreSQL judges the statement (it may refuse it its own way)."""
    del sqlstate
    emu = start_emulator(service="dsql", dsql_rules=DsqlRules().replace(**{rule: False}))
    name = f"t_{uuid.uuid4().hex[:12]}"
    with connect(emu, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, n int)")
        try:
            with conn.transaction():
                conn.execute(statement.format(t=name))
        except psycopg.Error as exc:
            refused_as_dsql = exc.diag.message_primary == message
            assert not refused_as_dsql
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {name}, {name}_c, {name}_s CASCADE")
            conn.execute(f"DROP SEQUENCE IF EXISTS {name}_seq")


def test_unlisten_passes(admin: psycopg.Connection[Any]) -> None:
    """asyncpg's pools reset connections with ``UNLISTEN *``: it has nothing to undo."""
    admin.execute("UNLISTEN *")


def test_cached_sequence_is_allowed(admin: psycopg.Connection[Any]) -> None:
    name = f"seq_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SEQUENCE {name} CACHE 65536")
    admin.execute(f"DROP SEQUENCE {name}")


def test_keywords_inside_strings_and_comments_are_not_statements(
    admin: psycopg.Connection[Any],
) -> None:
    row = admin.execute(
        "SELECT 'TRUNCATE x; SAVEPOINT y' /* LISTEN z; */ -- NOTIFY w;\n, $$CREATE TEMP$$"
    ).fetchone()
    assert row == ("TRUNCATE x; SAVEPOINT y", "CREATE TEMP")


def test_second_ddl_in_a_transaction_is_refused(admin: psycopg.Connection[Any]) -> None:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin.autocommit = False
    admin.execute(f"CREATE TABLE {name}_a (id int PRIMARY KEY)")
    error = error_of(admin, f"CREATE TABLE {name}_b (id int PRIMARY KEY)")
    assert (error.sqlstate, error.diag.message_primary) == (
        "0A000",
        "multiple ddl statements not supported in a transaction",
    )
    admin.rollback()


def test_ddl_after_dml_and_dml_after_ddl_are_refused(
    admin: psycopg.Connection[Any], table: str
) -> None:
    admin.autocommit = False
    admin.execute(f"INSERT INTO {table} VALUES (3, 0)")
    error = error_of(admin, f"CREATE TABLE {table}_x (id int PRIMARY KEY)")
    assert (error.sqlstate, error.diag.message_primary) == (
        "0A000",
        "ddl and dml are not supported in the same transaction",
    )
    admin.rollback()
    admin.execute(f"ALTER TABLE {table} ADD COLUMN extra int")
    error = error_of(admin, f"INSERT INTO {table} VALUES (4, 0)")
    assert error.diag.message_primary == "ddl and dml are not supported in the same transaction"
    admin.rollback()


def test_ddl_and_dml_in_one_implicit_transaction_are_refused(
    admin: psycopg.Connection[Any], table: str
) -> None:
    """A multi-statement Query is one transaction: nothing of it is done."""
    with pytest.raises(psycopg.Error) as info:
        admin.cursor().execute(
            f"CREATE TABLE {table}_y (id int PRIMARY KEY); "
            f"INSERT INTO {table} VALUES (5, 0)".encode()
        )
    assert info.value.diag.message_primary == dq.DDL_DML_MESSAGE
    assert admin.execute("SELECT to_regclass(%s)", [f"{table}_y"]).fetchone() == (None,)


def test_one_ddl_per_transaction_in_a_row_is_fine(admin: psycopg.Connection[Any]) -> None:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin.autocommit = False
    admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
    admin.commit()
    admin.execute(f"INSERT INTO {name} VALUES (1)")
    admin.commit()
    admin.execute(f"DROP TABLE {name}")
    admin.commit()


# --- 5. transaction limits ---


def test_row_limit_fails_the_commit(admin: psycopg.Connection[Any], table: str) -> None:
    admin.autocommit = False
    admin.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(10, 3009) g")
    admin.commit()  # 3,000 rows: the limit itself is allowed
    admin.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(4000, 7000) g")
    with pytest.raises(psycopg.Error) as info:
        admin.commit()
    assert (info.value.sqlstate, info.value.diag.message_primary) == (
        "54000",
        "transaction row limit exceeded",
    )
    assert admin.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert admin.execute(f"SELECT count(*) FROM {table} WHERE id >= 4000").fetchone() == (0,)


def test_row_limit_refuses_the_next_statement(admin: psycopg.Connection[Any], table: str) -> None:
    admin.autocommit = False
    admin.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(4000, 7000) g")
    error = error_of(admin, f"SELECT count(*) FROM {table}")
    assert (error.sqlstate, error.diag.message_primary) == ("54000", dq.ROW_LIMIT_MESSAGE)
    admin.rollback()


def test_size_limit_fails_the_commit(admin: psycopg.Connection[Any], table: str) -> None:
    admin.execute(f"ALTER TABLE {table} ADD COLUMN pad text")
    admin.autocommit = False
    admin.execute(f"INSERT INTO {table} (id, pad) VALUES (%s, %s)", [100, "x" * (11 << 20)])
    with pytest.raises(psycopg.Error) as info:
        admin.commit()
    assert (info.value.sqlstate, info.value.diag.message_primary) == (
        "54000",
        "transaction size limit 10mb exceeded",
    )
    assert info.value.diag.message_detail == "Current transaction size 11mb 10mb"


def test_age_limit_refuses_after_five_minutes(
    start_emulator: EmulatorFactory, roles: None, backend: Backend
) -> None:
    emu = start_emulator(service="dsql")
    with connect(emu) as conn:
        conn.execute("SELECT 1")
        emu.clock.advance(301)
        error = error_of(conn, "SELECT 2")
    assert (error.sqlstate, error.diag.message_primary) == (
        "54000",
        "transaction age limit of 300s exceeded",
    )


def test_limits_can_be_turned_off(
    start_emulator: EmulatorFactory, roles: None, backend: Backend
) -> None:
    emu = start_emulator(service="dsql", dsql_rules=DsqlRules(transaction_limits=False))
    with connect(emu) as conn:
        conn.execute("SELECT 1")
        emu.clock.advance(301)
        assert conn.execute("SELECT 2").fetchone() == (2,)


# --- 6. optimistic concurrency ---


def test_concurrent_writers_do_not_wait_the_second_conflicts(dsql: Emulator, table: str) -> None:
    with connect(dsql) as first, connect(dsql) as second:
        first.execute(f"UPDATE {table} SET n = n + 1 WHERE id = 1")
        error = error_of(second, f"UPDATE {table} SET n = n + 10 WHERE id = 1")
        assert (error.sqlstate, error.diag.message_primary) == ("40001", OC000)
        first.commit()
        second.rollback()
        assert second.execute(f"SELECT n FROM {table} WHERE id = 1").fetchone() == (1,)


def test_write_after_a_concurrent_commit_conflicts(dsql: Emulator, table: str) -> None:
    """Snapshot isolation: a row changed since the transaction began cannot be written."""
    with connect(dsql) as first, connect(dsql) as second:
        second.execute(f"SELECT n FROM {table} WHERE id = 2")  # its snapshot
        first.execute(f"UPDATE {table} SET n = 5 WHERE id = 2")
        first.commit()
        error = error_of(second, f"UPDATE {table} SET n = 6 WHERE id = 2")
        assert (error.sqlstate, error.diag.message_primary) == ("40001", OC000)


def test_different_rows_do_not_conflict(dsql: Emulator, table: str) -> None:
    with connect(dsql) as first, connect(dsql) as second:
        first.execute(f"UPDATE {table} SET n = 1 WHERE id = 1")
        second.execute(f"UPDATE {table} SET n = 2 WHERE id = 2")
        first.commit()
        second.commit()


def test_schema_change_conflicts_with_oc001(dsql: Emulator, table: str) -> None:
    with connect(dsql) as first, connect(dsql) as second:
        first.execute(f"ALTER TABLE {table} ADD COLUMN extra int")
        error = error_of(second, f"INSERT INTO {table} VALUES (9, 9)")
        assert (error.sqlstate, error.diag.message_primary) == ("40001", OC001)
        first.rollback()


def test_forced_conflict_fails_the_next_commit_once(dsql: Emulator, table: str) -> None:
    with connect(dsql) as conn, connect(dsql) as bystander:
        dsql.force_conflict(backend_pid=conn.info.backend_pid)
        bystander.execute(f"UPDATE {table} SET n = 7 WHERE id = 2")
        bystander.commit()  # another session's commit is not touched
        conn.execute(f"UPDATE {table} SET n = 3 WHERE id = 1")
        with pytest.raises(psycopg.Error) as info:
            conn.commit()
        assert (info.value.sqlstate, info.value.diag.message_primary) == ("40001", OC000)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute(f"SELECT n FROM {table} WHERE id = 1").fetchone() == (0,)
        conn.execute(f"UPDATE {table} SET n = 4 WHERE id = 1")
        conn.commit()  # once only
        assert conn.execute(f"SELECT n FROM {table} WHERE id = 1").fetchone() == (4,)


def test_forced_schema_conflict_says_oc001(dsql: Emulator) -> None:
    with connect(dsql) as conn:
        dsql.force_conflict(schema=True)
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.Error) as info:
            conn.commit()
    assert (info.value.sqlstate, info.value.diag.message_primary) == ("40001", OC001)


def test_force_conflict_needs_dsql(emulator: Emulator) -> None:
    with pytest.raises(RuntimeError, match="DSQL"):
        emulator.force_conflict()


def test_without_occ_writers_wait_as_on_postgresql(
    start_emulator: EmulatorFactory, roles: None
) -> None:
    emu = start_emulator(service="dsql", dsql_rules=DsqlRules(occ=False))
    name = f"t_{uuid.uuid4().hex[:12]}"
    with connect(emu, autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, n int)")
        admin.execute(f"INSERT INTO {name} VALUES (1, 0)")
        try:
            with connect(emu) as first, connect(emu) as second:
                first.execute(f"UPDATE {name} SET n = 1 WHERE id = 1")
                second.execute("SET lock_timeout = '50ms'")
                error = error_of(second, f"UPDATE {name} SET n = 2 WHERE id = 1")
                assert error.sqlstate == "55P03"  # PostgreSQL's own: it waited
        finally:
            admin.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))


# --- how statements are told apart (no database needed) ---


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("select 1; select 2;;", ["other", "other"]),
        ("select $tag$ ; truncate $tag$; truncate t", ["other", "dml"]),
        ("select E'it\\'s; savepoint' ; begin", ["other", "begin"]),
        ("/* a /* nested; */ comment; */ commit", ["commit"]),
        ('select "truncate;"; rollback', ["other", "rollback"]),
        ("with x as (insert into t values (1) returning 1) select * from x", ["dml"]),
        ("select * from t for update", ["other"]),
        ("create unique index async i on t (a)", ["ddl"]),
        ("AWS IAM GRANT reader TO 'arn:aws:iam::1:role/r'", ["iam"]),
        ("commit prepared 'x'", ["other"]),
    ],
)
def test_statements_are_split_and_classified(text: str, kinds: list[str]) -> None:
    rules = DsqlRules()
    found = [dq.classify(tokens, rules).kind for tokens in dq.split_statements(text)]
    assert found == kinds


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("create sequence s cache 1", False),
        ("create sequence s cache 65536", False),
        ("create sequence s cache 100", True),
        ("create table t (note text default 'serial')", False),
        ("create table t (id bigserial)", True),
        ("create or replace trigger x after insert on t execute function f()", True),
        ("create global temporary table t (a int)", True),
        ("alter table t add column p int references u", True),
        ("create index async i on t (serial)", False),
    ],
)
def test_refusals_read_the_statement(text: str, refused: bool) -> None:
    (tokens,) = dq.split_statements(text)
    assert (dq.classify(tokens, DsqlRules()).refusal is not None) == refused


# --- names, strings and comments that spell a refused feature ---

#: Words DSQL's refusals are about. Each names a column, table or sequence unquoted in
#: PostgreSQL, except the reserved ones, which need quotes.
KEYWORD_NAMES = [
    "serial",
    "bigserial",
    "smallserial",
    "serial4",
    "sequence",
    "trigger",
    "temp",
    "temporary",
    "truncate",
    "listen",
    "notify",
    "extension",
    "savepoint",
    "key",
    "cache",
    "insert",
    "update",
    "delete",
]
RESERVED_NAMES = ["references", "foreign", "constraint", "like", "table", "create"]

#: Valid DSQL that spells refused features as names, strings, comments or bodies; ``{t}`` is
#: a fresh name, ``{u}`` a table ``(id int PRIMARY KEY, n int)`` holding rows 1 and 2.
VALID = [
    "CREATE TABLE {t} (id uuid PRIMARY KEY, serial int)",
    "CREATE TABLE {t} (id int PRIMARY KEY, bigserial text, smallserial int, serial8 int)",
    'CREATE TABLE {t} (id int PRIMARY KEY, "serial" int, "references" int, "foreign" text)',
    "CREATE TABLE {t} (id int PRIMARY KEY, sequence int, trigger text, temp int, temporary int)",
    "CREATE TABLE {t} (id int PRIMARY KEY, truncate int, listen int, notify int, extension int)",
    "CREATE TABLE {t} (id int PRIMARY KEY, key int, cache int, insert int, update int)",
    "CREATE TABLE {t} (id int PRIMARY KEY, note text DEFAULT 'serial REFERENCES u FOREIGN KEY')",
    "CREATE TABLE {t} (id int PRIMARY KEY, CONSTRAINT serial UNIQUE (id))",
    "CREATE TABLE {t} (id int PRIMARY KEY, n int CHECK (n > 0)) -- serial REFERENCES u",
    "CREATE TABLE {t} (id int PRIMARY KEY /* , p int REFERENCES u, s serial */)",
    "CREATE TABLE {t} AS SELECT 1 AS references, 2 AS serial",
    "CREATE TABLE {t} (serial, sequence) AS SELECT 1, 2",
    'CREATE TABLE "serial{t}" (id int PRIMARY KEY)',
    "CREATE TABLE serial{t} (id int PRIMARY KEY)",
    "CREATE INDEX ASYNC ON {u} (n)",
    "ALTER TABLE {u} ADD COLUMN serial int",
    "ALTER TABLE {u} ADD COLUMN IF NOT EXISTS trigger text",
    "ALTER TABLE {u} RENAME COLUMN n TO serial",
    "ALTER TABLE {u} ADD COLUMN note text DEFAULT 'FOREIGN KEY'",
    "CREATE SEQUENCE {t} CACHE 1",
    "CREATE VIEW {t} AS SELECT n AS serial, id AS references FROM {u}",
    (
        "CREATE FUNCTION {t}() RETURNS text LANGUAGE sql "
        "AS $body$ SELECT 'CREATE TEMP TABLE x (id serial); TRUNCATE x' $body$"
    ),
    "SELECT 'TRUNCATE {u}; SAVEPOINT s; LISTEN c' AS truncate, $$ NOTIFY c $$ AS notify",
    "SELECT E'it\\'s; ROLLBACK TO s' AS savepoint",
]


def run_valid(conn: psycopg.Connection[Any], statement: str, u: str) -> None:
    """Run ``statement`` in a transaction of its own, then drop what it made."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with conn.transaction():
            conn.execute(statement.format(t=name, u=u))
    finally:
        made = conn.execute(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname LIKE %s "
            "AND c.relkind IN ('r', 'v', 'S')",
            [SCHEMA, f"%{name}"],
        ).fetchall()
        for relname, relkind in made:
            kind = {"r": "TABLE", "v": "VIEW", "S": "SEQUENCE"}[relkind]
            conn.execute(sql.SQL(f"DROP {kind} {{}}").format(sql.Identifier(relname)))
        conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}").format(sql.Identifier(name)))


@pytest.mark.parametrize("statement", VALID)
def test_valid_dsql_that_spells_a_refused_feature_passes(
    admin: psycopg.Connection[Any], table: str, statement: str
) -> None:
    """Names, strings, comments and bodies are not statements: the backend runs them all."""
    run_valid(admin, statement, table)


@pytest.mark.parametrize("statement", VALID)
def test_valid_dsql_that_spells_a_refused_feature_is_not_refused(statement: str) -> None:
    for tokens in dq.split_statements(statement.format(t="t1", u="u1")):
        assert dq.classify(tokens, DsqlRules()).refusal is None


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("copy (select * from t where a = 1) to stdout", ["other"]),
        ("copy t (a, b) from stdin", ["dml"]),
        ("with a as (select insert, update from log) select * from a", ["other"]),
        ("with insert as (select 1) select * from insert", ["other"]),
        ("with x (a) as materialized (select 1), y as (delete from t) select 1", ["dml"]),
        ("with x as (select 1) update t set a = 1", ["dml"]),
        ("with x as (select 1) select * from t for update", ["other"]),
        (
            (
                "create function f() returns int language sql begin atomic "
                "insert into a values (case when true then 1 end); insert into b values (1); "
                "end; commit"
            ),
            ["ddl", "commit"],
        ),
        (
            "create rule r as on insert to t do also (notify c; select 1); select 2",
            ["ddl", "other"],
        ),
    ],
)
def test_statements_are_told_apart_by_their_structure(text: str, kinds: list[str]) -> None:
    """A word in a name, a subquery or a routine body does not change what a statement is."""
    rules = DsqlRules()
    found = [dq.classify(tokens, rules).kind for tokens in dq.split_statements(text)]
    assert found == kinds


def test_ddl_then_copy_to_is_not_a_ddl_dml_mix(admin: psycopg.Connection[Any], table: str) -> None:
    """``COPY (SELECT ... FROM t) TO`` reads: it may follow a DDL statement in a transaction."""
    admin.autocommit = False
    admin.execute(f"ALTER TABLE {table} ADD COLUMN serial int")
    with admin.cursor().copy(f"COPY (SELECT id FROM {table} ORDER BY id) TO STDOUT") as copy:
        assert b"".join(bytes(block) for block in copy) == b"1\n2\n"
    admin.rollback()


def spell(name: str) -> st.SearchStrategy[str]:
    """``name`` as PostgreSQL reads it the same: any letter case, or double-quoted."""
    quoted = f'"{name}"'
    if name in RESERVED_NAMES:
        return st.just(quoted)
    cased = st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda upper: "".join(c.upper() if u else c for c, u in zip(name, upper, strict=True))
    )
    return st.one_of(cased, st.just(quoted))


NAMES = st.sampled_from(KEYWORD_NAMES + RESERVED_NAMES).flatmap(spell)
WORDS = st.sampled_from(
    ["SERIAL", "REFERENCES", "FOREIGN KEY", "TRIGGER", "TEMP", "TRUNCATE", "LISTEN", "NOTIFY"]
)
PASSING = [
    "CREATE TABLE {a} (id int PRIMARY KEY, {b} int, {c} text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS s.{a} ({b} uuid PRIMARY KEY, {c} bigint DEFAULT 0)",
    "CREATE TABLE {a} ({b} int, CONSTRAINT {c} PRIMARY KEY ({b}))",
    "CREATE TABLE {a} AS SELECT 1 AS {b}, x.{c} FROM x",
    "ALTER TABLE {a} ADD COLUMN {b} int, ADD {c} text",
    "ALTER TABLE {a} RENAME COLUMN {b} TO {c}",
    "ALTER TABLE {a} ADD CONSTRAINT {b} UNIQUE ({c})",
    "CREATE INDEX ASYNC {a} ON {b} ({c})",
    "CREATE VIEW {a} AS SELECT {b} FROM {c}",
    "CREATE SEQUENCE {a} CACHE 1",
    "CREATE TABLE {a} (id int, n text DEFAULT '{w}') -- {w}",
    "CREATE TABLE {a} (id int /* , {b} int {w} */)",
    "CREATE FUNCTION {a}() RETURNS int LANGUAGE sql AS $f$ {w} $f$",
    "SELECT {b} FROM {a} WHERE {c} = '{w}'",
    "WITH {a} AS (SELECT {b} FROM {c}) SELECT * FROM {a}",
    "COPY (SELECT {b} FROM {a}) TO STDOUT",
    "INSERT INTO {a} ({b}, {c}) VALUES (1, '{w}')",
]
REFUSING = [
    ("CREATE TABLE {a} ({b} serial PRIMARY KEY, {c} int)", "sequences"),
    ("CREATE TABLE {a} ({b} int, {c} BIGSERIAL)", "sequences"),
    ("ALTER TABLE {a} ADD COLUMN {b} smallserial", "sequences"),
    ("CREATE TABLE {a} ({b} int REFERENCES {c} ({b}))", "foreign_keys"),
    ("CREATE TABLE {a} ({b} int, FOREIGN KEY ({b}) REFERENCES {c})", "foreign_keys"),
    ("ALTER TABLE {a} ADD CONSTRAINT {b} FOREIGN KEY ({c}) REFERENCES {a}", "foreign_keys"),
    ("ALTER TABLE {a} ADD COLUMN {b} int REFERENCES {c}", "foreign_keys"),
    ("CREATE TRIGGER {a} AFTER INSERT ON {b} EXECUTE FUNCTION {c}()", "triggers"),
    ("CREATE TEMP TABLE {a} ({b} int)", "temporary_tables"),
    ("TRUNCATE {a}", "truncate"),
    ("LISTEN {a}", "listen_notify"),
    ("NOTIFY {a}, '{w}'", "listen_notify"),
    ("CREATE EXTENSION {a}", "extensions"),
    ("CREATE SEQUENCE {a} CACHE 10", "sequences"),
    ("SAVEPOINT {a}", "savepoint"),
]


def refusals(template: str, a: str, b: str, c: str, w: str) -> list[dq.Refusal | None]:
    text = template.format(a=a, b=b, c=c, w=w)
    return [dq.classify(tokens, DsqlRules()).refusal for tokens in dq.split_statements(text)]


@given(st.sampled_from(PASSING), NAMES, NAMES, NAMES, WORDS)
def test_names_spelled_like_refused_features_pass(
    template: str, a: str, b: str, c: str, w: str
) -> None:
    """Any name, string or comment in valid DSQL: no refusal."""
    assert refusals(template, a, b, c, w) == [None]


@given(st.sampled_from(REFUSING), NAMES, NAMES, NAMES, WORDS)
def test_refused_features_are_refused_whatever_their_names(
    case: tuple[str, str], a: str, b: str, c: str, w: str
) -> None:
    """The refusals keep reading the statement, whatever it names."""
    template, rule = case
    (refusal,) = refusals(template, a, b, c, w)
    assert refusal is not None
    assert refusal.rule == rule


def test_iam_statements_are_parsed() -> None:
    (tokens,) = dq.split_statements("""AWS IAM REVOKE "Mixed" FROM 'arn:aws:iam::1:role/a''b'""")
    assert dq.classify(tokens, DsqlRules()).iam == ("REVOKE", "Mixed", "arn:aws:iam::1:role/a'b")


def test_rds_mode_looks_at_no_statement(emulator: Emulator) -> None:
    """The RDS presets relay bytes: what DSQL refuses, PostgreSQL runs."""
    assert emulator.dsql_rules is None
    with iampg.connect(endpoint_for(emulator)) as conn:
        conn.execute("savepoint s1")
        conn.execute("create temporary table scratch (id serial)")
        conn.execute("truncate scratch")


def test_dsql_rules_must_be_dsql_rules(backend: Backend) -> None:
    with pytest.raises(iampg.ConfigurationError, match="DsqlRules"):
        Emulator(backend.dsn, service="dsql", dsql_rules={"savepoint": False})  # type: ignore[arg-type]
