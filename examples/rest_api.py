"""The seed's users REST API (POST/GET/PUT/DELETE /users) on Flask and an iampg pool.

With no endpoint configured, this starts the local emulator and drives the API with Flask's
test client, like the seed's curl calls, then again after the first token expired. Given an
endpoint, it does the same on AWS; ``--serve`` serves the API instead::

    python examples/rest_api.py                        # emulator, scripted requests
    python examples/rest_api.py --serve                # emulator, http://127.0.0.1:3000
    python examples/rest_api.py --host my-cluster.cluster-abc.us-east-1.rds.amazonaws.com \
        --user postgres [--serve]                      # Aurora (express), RDS, RDS Proxy

    curl -s -X POST http://127.0.0.1:3000/users -H 'Content-Type: application/json' \
        -d '{"name":"ClassMethod Taro","email":"mesota@example.com"}'

Needs ``pip install flask``. The scripted run only adds and removes its own row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg_pool
from flask import Flask, Response, jsonify, request
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

Pool = psycopg_pool.ConnectionPool[psycopg.Connection[Any]]


def _user(row: dict[str, Any]) -> dict[str, Any]:
    """Render a row as the seed's API does (``createdAt`` in ISO 8601)."""
    return {
        "id": row["id"],
        "name": row["name"],
        "email": row["email"],
        "createdAt": row["created_at"].isoformat(),
    }


def _found(row: dict[str, Any] | None) -> Response | tuple[Response, int]:
    """Return the user as JSON, or a 404."""
    return jsonify(_user(row)) if row else (jsonify({"error": "not found"}), 404)


def create_app(pool: Pool) -> Flask:
    """Return the Flask app: CRUD on ``users`` through ``pool``."""
    app = Flask(__name__)
    with pool.connection() as conn:
        conn.execute(CREATE_TABLE)

    def one(sql: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
        with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    @app.post("/users")
    def create() -> tuple[Response, int]:
        body = request.get_json(force=True)
        if not isinstance(body, dict) or not body.get("name") or not body.get("email"):
            return jsonify({"error": "name and email are required"}), 400
        try:
            row = one(
                "insert into users (name, email) values (%s, %s) returning *",
                (body["name"], body["email"]),
            )
        except psycopg.errors.UniqueViolation:
            return jsonify({"error": "email already exists"}), 409
        assert row is not None
        return jsonify(_user(row)), 201

    @app.get("/users")
    def list_users() -> Response:
        with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute("select * from users order by id")
            return jsonify([_user(row) for row in cur.fetchall()])

    @app.get("/users/<int:user_id>")
    def get(user_id: int) -> Response | tuple[Response, int]:
        row = one("select * from users where id = %s", (user_id,))
        return _found(row)

    @app.put("/users/<int:user_id>")
    def update(user_id: int) -> Response | tuple[Response, int]:
        body = request.get_json(force=True)
        if not isinstance(body, dict):
            return jsonify({"error": "a JSON object is required"}), 400
        row = one(
            "update users set name = coalesce(%s, name), email = coalesce(%s, email) "
            "where id = %s returning *",
            (body.get("name"), body.get("email"), user_id),
        )
        return _found(row)

    @app.delete("/users/<int:user_id>")
    def delete(user_id: int) -> Response | tuple[Response, int]:
        row = one("delete from users where id = %s returning *", (user_id,))
        return _found(row)

    return app


def exercise(app: Flask, expire: Callable[[], None]) -> None:
    """Drive the API like the seed's curl calls; then once more after the token expired."""
    client = app.test_client()
    email = f"rest-{uuid.uuid4().hex[:8]}@example.com"

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = client.open(path, method=method, json=body)
        data = response.get_json()
        print(f"{method:<7}{path:<12}{response.status_code} {json.dumps(data)}")
        if response.status_code >= 400:
            raise SystemExit(f"{method} {path} failed with {response.status_code}")
        return data

    user = call("POST", "/users", {"name": "ClassMethod Taro", "email": email})
    users = call("GET", "/users")
    assert any(u["id"] == user["id"] for u in users)
    updated = call("PUT", f"/users/{user['id']}", {"name": "ClassMethod Jiro"})
    assert updated["name"] == "ClassMethod Jiro"
    call("DELETE", f"/users/{user['id']}")
    expire()
    user = call("POST", "/users", {"name": "After Expiry", "email": email})
    call("GET", f"/users/{user['id']}")
    call("DELETE", f"/users/{user['id']}")


def pool_for(provider: iampg.TokenProvider) -> Pool:
    """Return the app's pool (the seed's settings: 4-minute idle, room for a cold start)."""
    return iampg.ConnectionPool(
        provider=provider, min_size=0, max_size=4, max_idle=240.0, timeout=30.0, open=False
    )


@contextlib.contextmanager
def emulated() -> Iterator[tuple[iampg.TokenProvider, Callable[[Pool], Callable[[], None]]]]:
    """Start a throwaway PostgreSQL and the emulator; yield a provider that signs for it."""
    from iampg.emulator import Backend, Emulator

    print("no endpoint given: starting the local emulator")
    with Backend.auto() as backend, Emulator(backend.dsn) as emu:
        backend.ensure_role("postgres", iam=True)  # as on RDS: IAM logins need rds_iam
        os.environ.update(emu.aws_env())  # the emulator knows only the documented example keys
        ep = iampg.Endpoint(
            emu.host,
            user="postgres",
            port=emu.port,
            hostaddr=emu.listen_host,
            sslmode="verify-full",
            sslrootcert=str(emu.ca_file),
        )
        provider = iampg.TokenProvider(ep, clock=emu.clock.monotonic)

        def expirer(pool: Pool) -> Callable[[], None]:
            def expire() -> None:
                print("-- 15 minutes later (emulated): the first token has expired --")
                emu.clock.advance(901.0)
                pool.drain()  # the next requests need new connections, hence new tokens

            return expire

        yield provider, expirer


@contextlib.contextmanager
def on_aws(
    args: argparse.Namespace,
) -> Iterator[tuple[iampg.TokenProvider, Callable[[Pool], Callable[[], None]]]]:
    """Yield a provider for the endpoint given by arguments or the environment."""
    ep = iampg.Endpoint.parse(
        args.host or "", environ=os.environ, user=args.user, port=args.port, region=args.region
    )
    provider = iampg.TokenProvider(ep, profile=args.profile)

    def expirer(pool: Pool) -> Callable[[], None]:
        def expire() -> None:
            print("-- dropping the cached token and the pool's connections, as after expiry --")
            provider.invalidate()
            pool.drain()

        return expire

    yield provider, expirer


def main(argv: list[str] | None = None) -> int:
    """Run the example; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="cluster endpoint (default: $PGHOST, else the emulator)")
    parser.add_argument("--user", help="database user (default: $PGUSER)")
    parser.add_argument("--port", help="port (default: $PGPORT or 5432)")
    parser.add_argument("--region", help="AWS region (default: inferred from the host)")
    parser.add_argument("--profile", help="AWS profile to sign with")
    parser.add_argument("--serve", action="store_true", help="serve on 127.0.0.1:3000")
    args = parser.parse_args(argv)
    setup = on_aws(args) if (args.host or os.environ.get("PGHOST")) else emulated()
    try:
        with setup as (provider, expirer), pool_for(provider) as pool:
            app = create_app(pool)
            if args.serve:
                app.run(host="127.0.0.1", port=3000)
            else:
                exercise(app, expirer(pool))
                print(f"tokens signed: {provider.stats().refreshes}")
    except iampg.Error as exc:
        print(f"rest_api: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, iampg.ConfigurationError) else 1
    except psycopg.Error as exc:
        print(f"rest_api: database error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
