"""The seed's users REST API on Django, its native connection pool and IAM tokens, in one file.

``DATABASES`` comes from ``iampg.integrations.django.database()``: Django's own PostgreSQL
backend with a current token for every new pooled connection. With ``PGHOST`` empty this
starts the local emulator and drives the API with Django's test client (the seed's curl
calls), then again after the first token expired; ``--serve`` serves it instead::

    python examples/django_users/app.py                  # emulator, scripted requests
    python examples/django_users/app.py --serve          # emulator, http://127.0.0.1:8000
    PGHOST=my-cluster.cluster-abc.us-east-1.rds.amazonaws.com PGUSER=postgres \
        python examples/django_users/app.py [--serve]    # Aurora, RDS, RDS Proxy

    curl -s -X POST http://127.0.0.1:8000/users -H 'Content-Type: application/json' \
        -d '{"name":"ClassMethod Taro","email":"mesota@example.com"}'

Needs ``pip install "iampg[django]"`` (Django 5.1 or later). The scripted run only adds and
removes its own row in a ``users`` table (created if missing).
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

import django
from django.conf import settings
from django.db import IntegrityError, connection, models
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

import iampg
from iampg.integrations.django import database, retry_transaction

CREATE_TABLE = """
create table if not exists users (
    id integer primary key generated always as identity,
    name varchar(255) not null,
    email varchar(255) not null unique,
    created_at timestamptz not null default now()
)
"""


# What settings.py holds in a project (no middleware: no CSRF check for the JSON API).
# DATABASES is set by use_database() once the endpoint is known.
settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
    ROOT_URLCONF=__name__,
    USE_TZ=True,
)
django.setup()


def use_database(provider: iampg.TokenProvider) -> None:
    """Set DATABASES: Django's native pool, each new connection signed with a current token.

    In a project's settings.py, the same line with the cluster's endpoint instead of the
    provider: ``"default": database("postgresql://app@<cluster endpoint>/app", pool=...)``.
    """
    settings.DATABASES = {
        "default": database(provider, pool={"min_size": 0, "max_size": 4, "max_idle": 240.0})
    }


class User(models.Model):  # type: ignore[misc]  # Django ships no type hints
    """A row of the seed's ``users`` table."""

    name = models.CharField(max_length=255)
    email = models.CharField(max_length=255, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        """The seed's table, outside any installed app."""

        app_label = "users"
        db_table = "users"
        managed = False  # the table is created by CREATE_TABLE, as in the seed

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>"

    def as_json(self) -> dict[str, Any]:
        """Render the user as the seed's API does (``createdAt`` in ISO 8601)."""
        return {
            "id": self.pk,
            "name": self.name,
            "email": self.email,
            "createdAt": self.created_at.isoformat(),
        }


def _body(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def users(request: HttpRequest) -> HttpResponse:
    """GET lists the users; POST creates one."""
    if request.method == "GET":
        return JsonResponse([u.as_json() for u in User.objects.order_by("id")], safe=False)
    body = _body(request)
    if not body.get("name") or not body.get("email"):
        return JsonResponse({"error": "name and email are required"}, status=400)
    try:
        user = User.objects.create(name=body["name"], email=body["email"])
    except IntegrityError:
        return JsonResponse({"error": "email already exists"}, status=409)
    return JsonResponse(user.as_json(), status=201)


def user(request: HttpRequest, user_id: int) -> HttpResponse:
    """GET, PUT or DELETE one user."""
    found = User.objects.filter(pk=user_id).first()
    if found is None:
        return JsonResponse({"error": "not found"}, status=404)
    if request.method == "DELETE":
        found.delete()
        return HttpResponse(status=204)
    if request.method == "PUT":
        body = _body(request)

        @retry_transaction()  # runs again if a concurrent writer won the race (DSQL: OC000)
        def update() -> None:
            User.objects.filter(pk=user_id).update(
                **{k: body[k] for k in ("name", "email") if body.get(k)}
            )

        update()
        found.refresh_from_db()
    return JsonResponse(found.as_json())


urlpatterns = [path("users", users), path("users/<int:user_id>", user)]


def scripted(provider: iampg.TokenProvider, expire: Callable[[], None]) -> None:
    """Drive the API like the seed's curl calls, then once more after the token expired."""
    from django.test import Client

    client = Client()
    email = f"django-{uuid.uuid4().hex[:8]}@example.com"
    created = client.post(
        "/users", {"name": "ClassMethod Taro", "email": email}, content_type="application/json"
    )
    print(f"POST   {created.status_code} {created.json()}")
    user_id = created.json()["id"]
    print(f"GET    {client.get(f'/users/{user_id}').json()}")
    updated = client.put(
        f"/users/{user_id}", {"name": "ClassMethod Jiro"}, content_type="application/json"
    )
    print(f"PUT    {updated.json()}")
    expire()
    connection.close()  # back to the pool (Django's test client keeps it between requests)
    connection.pool.drain()  # as if the pool had recycled them: the next connection is new
    print(f"GET    {client.get(f'/users/{user_id}').json()} (a new connection, a new token)")
    print(f"DELETE {client.delete(f'/users/{user_id}').status_code}")
    print(f"tokens signed: {provider.stats().refreshes}")
    if provider.stats().refreshes < 2:
        raise SystemExit("the new connection did not sign a new token")
    if updated.json()["name"] != "ClassMethod Jiro":
        raise SystemExit("the update was lost")


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

        try:
            yield iampg.TokenProvider(ep, clock=emu.clock.monotonic), expire
        finally:
            connection.close_pool()


@contextlib.contextmanager
def on_aws() -> Iterator[tuple[iampg.TokenProvider, Callable[[], None]]]:
    """Yield a provider for the endpoint in PGHOST, PGUSER, PGPORT, PGDATABASE."""
    provider = iampg.TokenProvider(iampg.Endpoint.from_env())

    def expire() -> None:
        print("dropping the cached token, as if it had expired")
        provider.invalidate()

    try:
        yield provider, expire
    finally:
        connection.close_pool()


def main(argv: list[str] | None = None) -> int:
    """Run the example; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="serve on 127.0.0.1:8000")
    args = parser.parse_args(argv)
    try:
        with on_aws() if os.environ.get("PGHOST") else emulated() as (provider, expire):
            use_database(provider)
            with connection.cursor() as cur:
                cur.execute(CREATE_TABLE)
            if args.serve:
                from django.core.management import call_command

                call_command("runserver", "127.0.0.1:8000", use_reloader=False)
            else:
                scripted(provider, expire)
    except iampg.Error as exc:
        print(f"django_users: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, iampg.ConfigurationError) else 1
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
