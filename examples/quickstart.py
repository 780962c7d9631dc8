"""Quick start: the seed's users CRUD through an iampg pool, across a token refresh.

With no endpoint configured, this starts the local emulator (an IAM-checking gateway in front
of a throwaway PostgreSQL) and runs there. Given an endpoint, it runs the same scenario on AWS
with your AWS credentials::

    python examples/quickstart.py                      # embedded emulator
    python examples/quickstart.py --host my-cluster.cluster-abc.us-east-1.rds.amazonaws.com \
        --user postgres                                # Aurora (express), RDS, RDS Proxy
    PGHOST=... PGUSER=... AWS_REGION=... python examples/quickstart.py

On AWS the scenario only adds and removes its own row in a ``users`` table (created if it does
not exist), so it is safe to run against a database that already has one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

import iampg

CREATE_TABLE = """
create table if not exists users (
    id integer primary key generated always as identity,
    name varchar(255) not null,
    email varchar(255) not null unique,
    created_at timestamptz not null default now()
)
"""


def show(verb: str, what: object) -> None:
    """Print one step of the scenario like the seed's curl calls."""
    print(f"{verb:<7}{json.dumps(what, default=str)}")


def crud(pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]], run_id: str) -> None:
    """Create, list, update and delete a user, each through a pooled connection."""
    email = f"quickstart-{run_id}@example.com"
    with pool.connection() as conn:
        conn.execute(CREATE_TABLE)
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "insert into users (name, email) values (%s, %s) returning *",
            ("ClassMethod Taro", email),
        )
        user = cur.fetchone()
        assert user is not None
        show("POST", user)
        cur.execute("select * from users where email = %s order by id", (email,))
        show("GET", cur.fetchall())
        cur.execute(
            "update users set name = %s where id = %s returning *", ("ClassMethod Jiro", user["id"])
        )
        show("PUT", cur.fetchone())
        cur.execute("delete from users where id = %s returning *", (user["id"],))
        show("DELETE", cur.fetchone())


def scenario(provider: iampg.TokenProvider, expire_first_token: Callable[[str], None]) -> None:
    """Run the seed scenario on ``provider``'s endpoint, then show a token refresh."""
    run_id = uuid.uuid4().hex[:8]
    ep = provider.endpoint
    print(f"endpoint: {ep.user}@{ep.host}:{ep.port}/{ep.dbname} ({ep.kind}, {ep.region})")
    # The seed's pool settings: connections idle for 4 minutes close before Aurora cuts them
    # at about 5; min_size=0 lets a serverless cluster pause; 30 s covers a cold start.
    with iampg.ConnectionPool(
        provider=provider,
        min_size=0,
        max_size=4,
        max_idle=240.0,
        timeout=30.0,
        open=False,
    ) as pool:
        started = time.perf_counter()
        crud(pool, run_id)
        print(f"CRUD done in {time.perf_counter() - started:.2f} s through an iampg pool")

        first = provider.token()
        signed = provider.stats().refreshes
        expire_first_token(first)
        pool.drain()  # every connection from here on is new and needs a valid token
        with pool.connection() as conn:
            row = conn.execute("select count(*) from users").fetchone()
        stats = provider.stats()
        # Counted, not compared: a token signed again within the same second is the same
        # string (SigV4 signs the time to the second).
        renewed = stats.refreshes > signed
        print(
            f"after the first token expired: new connection ok, users={row[0] if row else '?'}, "
            f"token {'renewed' if renewed else 'NOT renewed'} "
            f"(tokens signed: {stats.refreshes}, served from cache: {stats.hits})"
        )
        if not renewed:
            raise SystemExit("the provider did not renew its token")


@contextlib.contextmanager
def emulated() -> Iterator[tuple[iampg.TokenProvider, Callable[[str], None]]]:
    """Start a throwaway PostgreSQL and the emulator; yield a provider that signs for it."""
    from iampg.emulator import Backend, Emulator

    print("no endpoint given: starting the local emulator")
    with Backend.auto() as backend, Emulator(backend.dsn) as emu:
        backend.ensure_role("postgres", iam=True)  # as on RDS: IAM logins need rds_iam
        # The emulator knows only the documented example keys: sign with those.
        os.environ.update(emu.aws_env())
        ep = iampg.Endpoint(
            emu.host,
            user="postgres",
            port=emu.port,
            hostaddr=emu.listen_host,
            sslmode="verify-full",
            sslrootcert=str(emu.ca_file),
        )
        # The provider reads the emulator's clock: moving it expires the token on both sides.
        provider = iampg.TokenProvider(ep, clock=emu.clock.monotonic)

        def expire(first: str) -> None:
            print("moving the emulator's clock 15 minutes ahead: the first token expires")
            emu.clock.advance(901.0)
            try:
                psycopg.connect(iampg.conninfo(ep, provider), password=first).close()
            except psycopg.OperationalError as exc:
                print(f"the emulator now refuses it: {str(exc).splitlines()[-1].strip()}")
            else:
                raise SystemExit("the emulator accepted an expired token")

        yield provider, expire


@contextlib.contextmanager
def on_aws(args: argparse.Namespace) -> Iterator[tuple[iampg.TokenProvider, Callable[[str], None]]]:
    """Yield a provider for the endpoint given by arguments or the environment."""
    ep = iampg.Endpoint.parse(
        args.host or "",
        environ=os.environ,
        user=args.user,
        port=args.port,
        dbname=args.dbname,
        region=args.region,
    )
    provider = iampg.TokenProvider(ep, profile=args.profile)

    def expire(first: str) -> None:  # noqa: ARG001
        # Nobody waits 15 minutes in a quick start: drop the cached token instead, which is
        # what happens when it expires. The next connection must authenticate with a new one.
        print("dropping the cached token, as if it had expired")
        provider.invalidate()

    yield provider, expire


def main(argv: list[str] | None = None) -> int:
    """Run the quick start; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="cluster endpoint (default: $PGHOST, else the emulator)")
    parser.add_argument("--user", help="database user (default: $PGUSER)")
    parser.add_argument("--port", help="port (default: $PGPORT or 5432)")
    parser.add_argument("--dbname", help="database (default: $PGDATABASE or the user)")
    parser.add_argument("--region", help="AWS region (default: inferred from the host)")
    parser.add_argument("--profile", help="AWS profile to sign with")
    args = parser.parse_args(argv)
    setup = on_aws(args) if (args.host or os.environ.get("PGHOST")) else emulated()
    try:
        with setup as (provider, expire):
            scenario(provider, expire)
    except iampg.Error as exc:
        print(f"quickstart: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, iampg.ConfigurationError) else 1
    except psycopg.Error as exc:
        print(f"quickstart: database error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
