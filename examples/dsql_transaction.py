"""An Aurora DSQL transaction that retries when it loses an optimistic-concurrency race.

DSQL checks for conflicts at commit: the loser gets SQLSTATE ``40001`` with ``(OC000)`` in
the message (``(OC001)`` for schema) and its transaction is rolled back, to be run again.
``iampg.retry_transaction`` does that with exponential backoff and jitter. Here, concurrent
transfers between two accounts collide on purpose; the total balance stays the same and
every transfer lands.

    python examples/dsql_transaction.py                              # emulator, DSQL mode
    python examples/dsql_transaction.py --host <cluster id>.dsql.us-east-1.on.aws  # AWS

On AWS it uses the ``admin`` role (override with ``--user``) and only creates, uses and drops
its own table, ``iampg_example_accounts``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg import sql

import iampg

THREADS = 6
TRANSFERS = 5  # per thread


def run(provider: iampg.TokenProvider, isolation: psycopg.IsolationLevel | None) -> None:
    """Create two accounts, run concurrent transfers with retries, check the totals."""
    table = f"iampg_example_accounts_{uuid.uuid4().hex[:8]}"
    name = sql.Identifier(table)
    attempts = 0
    lock = threading.Lock()

    def configure(conn: psycopg.Connection[Any]) -> None:
        if isolation is not None:
            conn.isolation_level = isolation

    with iampg.ConnectionPool(
        provider=provider, min_size=0, max_size=THREADS, timeout=30.0, configure=configure
    ) as pool:
        with pool.connection() as conn:
            conn.autocommit = True  # DSQL runs DDL and DML in separate transactions
            conn.execute(
                sql.SQL("create table {} (id int primary key, balance int not null)").format(name)
            )
            conn.execute(sql.SQL("insert into {} values (1, 1000), (2, 1000)").format(name))

        def transfer(conn: psycopg.Connection[Any]) -> None:
            nonlocal attempts
            with lock:
                attempts += 1
            # Both rows are read and written by every transfer: concurrent ones conflict.
            conn.execute(sql.SQL("update {} set balance = balance - 10 where id = 1").format(name))
            conn.execute(sql.SQL("update {} set balance = balance + 10 where id = 2").format(name))

        def worker(_: int) -> None:
            for _i in range(TRANSFERS):
                iampg.retry_transaction(pool, transfer, attempts=20, base=0.01, cap=0.2)

        try:
            with ThreadPoolExecutor(THREADS) as executor:
                list(executor.map(worker, range(THREADS)))
            with pool.connection() as conn:
                rows = conn.execute(
                    sql.SQL("select id, balance from {} order by id").format(name)
                ).fetchall()
        finally:
            with pool.connection() as conn:
                conn.autocommit = True
                conn.execute(sql.SQL("drop table if exists {}").format(name))
    done = THREADS * TRANSFERS
    print(f"balances: {dict(rows)} (total {sum(b for _, b in rows)})")
    print(
        f"transfers: {done}, transaction attempts: {attempts}, retried after a conflict: "
        f"{attempts - done}"
    )
    if dict(rows) != {1: 1000 - 10 * done, 2: 1000 + 10 * done}:
        raise SystemExit("a transfer was lost or applied twice")


@contextlib.contextmanager
def emulated() -> Iterator[iampg.TokenProvider]:
    """Start a throwaway PostgreSQL and a DSQL-mode emulator; yield a provider for it."""
    from iampg.emulator import Backend, Emulator

    print("no endpoint given: starting the local emulator in DSQL mode")
    with Backend.auto() as backend, Emulator(backend.dsn, service="dsql") as emu:
        backend.ensure_role("admin", superuser=True)  # DSQL's built-in role
        os.environ.update(emu.aws_env())  # the emulator knows only the documented example keys
        ep = iampg.Endpoint(
            emu.host,  # <cluster id>.dsql.<region>.on.aws: kind and region are inferred
            port=emu.port,
            hostaddr=emu.listen_host,
            sslmode="verify-full",
            sslrootcert=str(emu.ca_file),
        )
        print(f"endpoint: {ep.user}@{ep.host} ({ep.kind}, {ep.region})")
        yield iampg.TokenProvider(ep, clock=emu.clock.monotonic)


def main(argv: list[str] | None = None) -> int:
    """Run the example; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="DSQL cluster endpoint or id (default: the emulator)")
    parser.add_argument("--user", help="database role (default: admin)")
    parser.add_argument("--region", help="AWS region (default: inferred from the host)")
    parser.add_argument("--profile", help="AWS profile to sign with")
    args = parser.parse_args(argv)
    try:
        if args.host:
            ep = iampg.Endpoint(args.host, kind="dsql", user=args.user, region=args.region)
            # DSQL always runs at repeatable read and reports conflicts at commit.
            run(iampg.TokenProvider(ep, profile=args.profile), None)
        else:
            with emulated() as provider:
                # The emulator runs DSQL's optimistic concurrency: the same code as on AWS.
                run(provider, None)
    except iampg.Error as exc:
        print(f"dsql_transaction: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, iampg.ConfigurationError) else 1
    except psycopg.Error as exc:
        print(f"dsql_transaction: database error: {exc}", file=sys.stderr)
        return 1
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
