"""The seed's users REST API on FastAPI, SQLAlchemy's asyncio ORM and asyncpg, with IAM tokens.

The engine comes from ``iampg.integrations.sqlalchemy.create_async_engine``: every new pooled
connection gets a current token, over TLS verifying the cluster's name, and signing never
blocks the event loop. With ``PGHOST`` empty this starts the local emulator and drives the API
in-process (the seed's curl calls), then again after the first token expired. On AWS::

    PGHOST=my-cluster.cluster-abc.us-east-1.rds.amazonaws.com PGUSER=postgres \
        python examples/fastapi_users.py                          # the scripted calls
    PGHOST=... PGUSER=... uvicorn --factory fastapi_users:app_from_env   # serve it

Needs ``pip install "iampg[sqlalchemy,asyncpg]" fastapi httpx``. The scripted run only adds
and removes its own row in a ``users`` table (created if missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated

import httpx
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel
from sqlalchemy import DateTime, String, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import iampg
from iampg.integrations.sqlalchemy import aretry_transaction, create_async_engine

CREATE_TABLE = """
create table if not exists users (
    id integer primary key generated always as identity,
    name varchar(255) not null,
    email varchar(255) not null unique,
    created_at timestamptz not null default now()
)
"""


class Base(DeclarativeBase):
    """The ORM's base class."""


class User(Base):
    """A row of the seed's ``users`` table."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    email: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=func.now())


class UserIn(BaseModel):
    """What POST and PUT accept."""

    name: str | None = None
    email: str | None = None


class UserOut(BaseModel):
    """What the API returns, as the seed's (``createdAt`` in ISO 8601)."""

    id: int
    name: str
    email: str
    createdAt: dt.datetime  # noqa: N815 -- the seed's JSON field

    @classmethod
    def of(cls, user: User) -> UserOut:
        """Render a row."""
        return cls(id=user.id, name=user.name, email=user.email, createdAt=user.created_at)


async def session(request: Request) -> AsyncIterator[AsyncSession]:
    """Give a request a session of the app's engine."""
    async with request.app.state.sessions() as s:
        yield s


DbSession = Annotated[AsyncSession, Depends(session)]


router = APIRouter()


@router.post("/users", status_code=201)
async def create(body: UserIn, s: DbSession) -> UserOut:
    """Create a user."""
    if not body.name or not body.email:
        raise HTTPException(400, "name and email are required")
    user = User(name=body.name, email=body.email)
    s.add(user)
    try:
        await s.commit()
    except IntegrityError:
        raise HTTPException(409, "email already exists") from None
    return UserOut.of(user)


@router.get("/users")
async def list_users(s: DbSession) -> list[UserOut]:
    """List the users."""
    return [UserOut.of(u) for u in await s.scalars(select(User).order_by(User.id))]


@router.get("/users/{user_id}")
async def read(user_id: int, s: DbSession) -> UserOut:
    """Return one user."""
    user = await s.get(User, user_id)
    if user is None:
        raise HTTPException(404, "not found")
    return UserOut.of(user)


@router.put("/users/{user_id}")
async def update(user_id: int, body: UserIn, request: Request) -> UserOut:
    """Change a user's name or email, in a transaction run again if it lost a race (DSQL)."""

    async def change(s: AsyncSession) -> User | None:
        user = await s.get(User, user_id)
        if user is not None:
            user.name = body.name or user.name
            user.email = body.email or user.email
        return user

    user = await aretry_transaction(request.app.state.sessions, change)
    if user is None:
        raise HTTPException(404, "not found")
    return UserOut.of(user)


@router.delete("/users/{user_id}", status_code=204)
async def delete(user_id: int, s: DbSession) -> None:
    """Delete a user."""
    user = await s.get(User, user_id)
    if user is None:
        raise HTTPException(404, "not found")
    await s.delete(user)
    await s.commit()


def create_app(engine: AsyncEngine) -> FastAPI:
    """Return the app: CRUD on ``users`` through ``engine``'s pool."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.execute(text(CREATE_TABLE))
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
    app.include_router(router)
    return app


def app_from_env() -> FastAPI:
    """Return the app for the endpoint in PGHOST, PGUSER, PGPORT, PGDATABASE (for uvicorn)."""
    return create_app(create_async_engine(iampg.Endpoint.from_env(), driver="asyncpg"))


async def scripted(provider: iampg.TokenProvider, expire: Callable[[], None]) -> None:
    """Drive the API like the seed's curl calls, then once more after the token expired."""
    engine = create_async_engine(provider, driver="asyncpg")  # postgresql+asyncpg
    app = create_app(engine)
    email = f"fastapi-{uuid.uuid4().hex[:8]}@example.com"
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c,
    ):
        created = (await c.post("/users", json={"name": "ClassMethod Taro", "email": email})).json()
        print(f"POST   {created}")
        path = f"/users/{created['id']}"
        print(f"GET    {(await c.get(path)).json()}")
        updated = await c.put(path, json={"name": "ClassMethod Jiro"})
        print(f"PUT    {updated.json()}")
        expire()
        await engine.dispose()  # as if the pool had recycled them: the next connection is new
        print(f"GET    {(await c.get(path)).json()} (a new connection, a new token)")
        print(f"DELETE {(await c.delete(path)).status_code}")
    print(f"tokens signed: {provider.stats().refreshes}")
    if updated.json()["name"] != "ClassMethod Jiro" or provider.stats().refreshes < 2:
        raise SystemExit("the update was lost, or no new token was signed")


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
    yield provider, provider.invalidate  # as if the cached token had expired


def main() -> int:
    """Run the example; return the exit code."""
    try:
        with on_aws() if os.environ.get("PGHOST") else emulated() as (provider, expire):
            asyncio.run(scripted(provider, expire))
    except iampg.Error as exc:
        print(f"fastapi_users: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, iampg.ConfigurationError) else 1
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
