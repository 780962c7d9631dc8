"""An AWS Lambda handler that keeps one iampg pool across invocations.

Deploy ``handler`` with the function's configuration in environment variables: ``PGHOST``
(the cluster endpoint), ``PGUSER``, optionally ``PGDATABASE``, ``PGPORT`` and ``AWS_REGION``
(Lambda sets it); the execution role needs ``rds-db:connect`` for that user. The pool and
its token cache live at module level, so warm invocations reuse the open connection and the
cached token; a new connection (after Aurora's idle cut, or a cold start) signs a new token
only when the cached one is close to expiry. No background thread is needed: the provider
refreshes lazily, which suits a CPU that is frozen between invocations.

Run locally, this simulates invocations (cold, warm, and one after the environment sat frozen
for 15 minutes, its token expired and its connection cut by the server)::

    python examples/lambda_handler.py                  # against the embedded emulator
    PGHOST=my-cluster.cluster-abc.us-east-1.rds.amazonaws.com PGUSER=postgres \
        python examples/lambda_handler.py              # against AWS
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

import psycopg
import psycopg_pool

import iampg

APPLICATION_NAME = "iampg-lambda-example"

# Set once per execution environment (module scope survives between warm invocations).
clock: iampg.Clock = time.monotonic  # the local simulation swaps in the emulator's clock
_provider: iampg.TokenProvider | None = None
_pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None = None


def _get_pool() -> psycopg_pool.ConnectionPool[psycopg.Connection[Any]]:
    """Return the module-level pool, creating it on the first (cold) invocation."""
    global _provider, _pool  # noqa: PLW0603 -- Lambda's way to keep state between calls
    if _pool is None:
        endpoint = iampg.Endpoint.from_env(application_name=APPLICATION_NAME)
        _provider = iampg.TokenProvider(endpoint, clock=clock)
        _pool = iampg.ConnectionPool(
            provider=_provider,
            min_size=0,  # nothing opened before it is needed; lets a serverless cluster pause
            max_size=1,  # one request at a time per execution environment
            max_idle=240.0,  # close before Aurora's ~5-minute idle cut
            timeout=30.0,  # room for a serverless cold start (~16 s)
            # The environment may have been frozen for hours: check a connection before use.
            check=psycopg_pool.ConnectionPool.check_connection,
        )
    return _pool


def handler(event: dict[str, Any], context: object) -> dict[str, Any]:  # noqa: ARG001
    """Handle ``{"action": "add", "name": ..., "email": ...}``, ``count`` or ``remove``."""
    pool = _get_pool()
    action = event.get("action", "count")
    with pool.connection() as conn:
        if action == "setup":
            conn.execute(
                "create table if not exists users (id integer primary key generated always as "
                "identity, name varchar(255) not null, email varchar(255) not null unique, "
                "created_at timestamptz not null default now())"
            )
            body: dict[str, Any] = {"ok": True}
        elif action == "add":
            row = conn.execute(
                "insert into users (name, email) values (%s, %s) returning id",
                (event["name"], event["email"]),
            ).fetchone()
            body = {"id": row[0] if row else None}
        elif action == "remove":
            conn.execute("delete from users where email = %s", (event["email"],))
            body = {"ok": True}
        else:
            row = conn.execute("select count(*), pg_backend_pid() from users").fetchone()
            body = {"users": row[0] if row else None, "backend_pid": row[1] if row else None}
    return {"statusCode": 200, "body": json.dumps(body)}


def simulate(expire: Any) -> None:
    """Invoke the handler as Lambda would: cold, warm, then after a long freeze."""
    email = f"lambda-{uuid.uuid4().hex[:8]}@example.com"

    def invoke(label: str, event: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        result = handler(event, None)
        body: dict[str, Any] = json.loads(result["body"])
        elapsed = (time.perf_counter() - started) * 1000
        print(
            f"{label:<28}{event['action']:<7} -> {result['statusCode']} {result['body']}"
            f" ({elapsed:.0f} ms)"
        )
        return body

    invoke("invocation 1 (cold)", {"action": "setup"})
    invoke("invocation 2 (warm)", {"action": "add", "name": "ClassMethod Taro", "email": email})
    before = invoke("invocation 3 (warm)", {"action": "count"})
    expire()
    after = invoke("invocation 4 (after freeze)", {"action": "count"})
    invoke("invocation 5 (warm)", {"action": "remove", "email": email})
    assert _provider is not None
    stats = _provider.stats()
    print(
        f"connection replaced: {before['backend_pid'] != after['backend_pid']}, "
        f"tokens signed: {stats.refreshes}, served from cache: {stats.hits}"
    )
    if before["backend_pid"] == after["backend_pid"]:
        raise SystemExit("the pool did not replace the cut connection")


def _simulate_on_emulator() -> None:
    """Start a throwaway PostgreSQL and the emulator; point the handler at it; simulate."""
    global clock  # noqa: PLW0603
    from iampg.emulator import Backend, Emulator

    print("no PGHOST given: starting the local emulator")
    with (
        Backend.auto() as backend,
        Emulator(backend.dsn) as emu,
        # Opened before the PG* variables below are set, which libpq would read.
        psycopg.connect(backend.dsn, autocommit=True) as admin,
    ):
        backend.ensure_role("postgres", iam=True)  # as on RDS: IAM logins need rds_iam
        # What the function's configuration would hold, plus what only the emulator needs.
        os.environ.update(emu.aws_env())
        os.environ.update(
            {
                "PGHOST": emu.host,
                "PGHOSTADDR": emu.listen_host,
                "PGPORT": str(emu.port),
                "PGUSER": "postgres",
                "PGSSLMODE": "verify-full",
                "PGSSLROOTCERT": str(emu.ca_file),
            }
        )
        clock = emu.clock.monotonic

        def expire() -> None:
            print(
                "-- frozen for 15 minutes: the token expires, the server cuts the idle session --"
            )
            emu.clock.advance(901.0)
            admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where application_name = %s",
                (APPLICATION_NAME,),
            )

        try:
            simulate(expire)
        finally:
            if _pool is not None:
                _pool.close()


def _simulate_on_aws() -> None:
    """Simulate on the endpoint given by PG* variables, with your AWS credentials."""

    def expire() -> None:
        print("-- dropping the cached token and the connection, as after a long freeze --")
        assert _provider is not None
        assert _pool is not None
        _provider.invalidate()
        _pool.drain()

    try:
        simulate(expire)
    finally:
        if _pool is not None:
            _pool.close()


def main() -> int:
    """Simulate invocations; return the exit code."""
    try:
        _simulate_on_aws() if os.environ.get("PGHOST") else _simulate_on_emulator()
    except iampg.Error as exc:
        print(f"lambda_handler: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, iampg.ConfigurationError) else 1
    except psycopg.Error as exc:
        print(f"lambda_handler: database error: {exc}", file=sys.stderr)
        return 1
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
