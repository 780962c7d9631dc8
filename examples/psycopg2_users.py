"""The seed's users CRUD on psycopg2: a ThreadedConnectionPool whose connections use IAM tokens.

Existing psycopg2 code changes one line: the pool comes from ``iampg.integrations.psycopg2``.
Every new connection gets a current token, so the pool keeps working after the first one
expired. With ``PGHOST`` empty this starts the local emulator; otherwise it runs on AWS::

    python examples/psycopg2_users.py                        # the embedded emulator
    PGHOST=my-cluster.cluster-abc.us-east-1.rds.amazonaws.com PGUSER=postgres \
        python examples/psycopg2_users.py                    # Aurora, RDS, RDS Proxy

Needs ``pip install "iampg[psycopg2]"``. On AWS it only adds and removes its own row in a
``users`` table (created if missing).
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
from psycopg2.extras import RealDictCursor

import iampg
from iampg.integrations import psycopg2 as iampg_psycopg2

CREATE_TABLE = """
create table if not exists users (
    id integer primary key generated always as identity,
    name varchar(255) not null,
    email varchar(255) not null unique,
    created_at timestamptz not null default now()
)
"""


def one(cur: RealDictCursor) -> dict[str, Any]:
    """Return the statement's one row."""
    row = cur.fetchone()
    if row is None:
        raise SystemExit("the statement returned no row")
    return dict(row)


def crud(pool: iampg_psycopg2.ThreadedConnectionPool) -> None:
    """Create, read, update and delete a user; each step commits on its pooled connection."""
    email = f"psycopg2-{uuid.uuid4().hex[:8]}@example.com"
    conn = pool.getconn()
    try:
        with conn, conn.cursor(cursor_factory=RealDictCursor) as cur:  # `with conn`: commit
            cur.execute(CREATE_TABLE)
        with conn, conn.cursor(cursor_factory=RealDictCursor) as cur:
            cur.execute(
                "insert into users (name, email) values (%s, %s) returning id, name",
                ("ClassMethod Taro", email),
            )
            user = one(cur)
            print(f"POST   {user}")
            cur.execute("select id, name, email from users where id = %s", (user["id"],))
            print(f"GET    {one(cur)}")
            cur.execute(
                "update users set name = %s where id = %s returning id, name",
                ("ClassMethod Jiro", user["id"]),
            )
            print(f"PUT    {one(cur)}")
            cur.execute("delete from users where id = %s", (user["id"],))
            print(f"DELETE {{'id': {user['id']}, 'deleted': {cur.rowcount}}}")
    finally:
        pool.putconn(conn)


def run(provider: iampg.TokenProvider, expire: Callable[[], None]) -> None:
    """Run the CRUD, let the token expire, and open a new pooled connection."""
    pool = iampg_psycopg2.ThreadedConnectionPool(1, 4, provider)
    try:
        crud(pool)
        expire()
        conn = pool.getconn()
        pool.putconn(conn, close=True)  # close the connection opened with the first token
        conn = pool.getconn()  # a new physical connection: it needs a new token
        with conn.cursor(cursor_factory=RealDictCursor) as cur:
            cur.execute("select current_user as user")
            print(f"new connection after the token expired: ok ({one(cur)['user']})")
        pool.putconn(conn)
    finally:
        pool.closeall()
    print(f"tokens signed: {provider.stats().refreshes}")
    if provider.stats().refreshes < 2:
        raise SystemExit("the new connection did not sign a new token")


@contextlib.contextmanager
def emulated() -> Iterator[tuple[iampg.TokenProvider, Callable[[], None]]]:
    """Start a throwaway PostgreSQL and the emulator; yield a provider that signs for it."""
    from iampg.emulator import Backend, Emulator

    print("no PGHOST given: starting the local emulator")
    with Backend.auto() as backend, Emulator(backend.dsn) as emu:
        backend.ensure_role("postgres", iam=True)  # as on RDS: IAM logins need rds_iam
        os.environ.update(emu.aws_env())  # the emulator knows only the documented example keys
        ep = iampg.Endpoint(
            emu.host,
            user="postgres",
            port=emu.port,
            hostaddr=emu.listen_host,  # dial the emulator; TLS and the token use the host name
            sslmode="verify-full",
            sslrootcert=str(emu.ca_file),
        )

        def expire() -> None:
            print("moving the emulator's clock 15 minutes ahead: the first token expires")
            emu.clock.advance(901.0)

        yield iampg.TokenProvider(ep, clock=emu.clock.monotonic), expire


@contextlib.contextmanager
def on_aws() -> Iterator[tuple[iampg.TokenProvider, Callable[[], None]]]:
    """Yield a provider for the endpoint in PGHOST, PGUSER, PGPORT, PGDATABASE."""
    provider = iampg.TokenProvider(iampg.Endpoint.from_env())

    def expire() -> None:
        print("dropping the cached token, as if it had expired")
        provider.invalidate()

    yield provider, expire


def main() -> int:
    """Run the example; return the exit code."""
    try:
        with on_aws() if os.environ.get("PGHOST") else emulated() as (provider, expire):
            run(provider, expire)
    except iampg.Error as exc:  # iampg_psycopg2's errors are psycopg2's too
        print(f"psycopg2_users: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, iampg.ConfigurationError) else 1
    except psycopg2.Error as exc:
        print(f"psycopg2_users: database error: {exc}", file=sys.stderr)
        return 1
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
