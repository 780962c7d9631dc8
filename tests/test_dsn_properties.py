"""Property tests: every DSN helper's output reads back exactly, by parsers and by libpq."""

from __future__ import annotations

import configparser
import ipaddress
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy.engine import make_url

import iampg
from iampg import Endpoint, SignedToken, TokenProvider
from iampg._dsn import alembic_url, connect_params, pgpass, sqlalchemy_url
from iampg.emulator import Backend, Emulator
from support import examples

# Characters that break naive encoders, plus any printable unicode.
SPECIAL = list("%&/:=?+@# '\\\"*;,[]{}$`~!")
TEXT = st.text(
    alphabet=st.sampled_from(SPECIAL)
    | st.characters(exclude_categories=("Cs", "Cc"), exclude_characters="\x00"),
    min_size=1,
    max_size=24,
)
# libpq parameters that have a PG* variable, so env() can carry them too.
EXTRA_KEYS = ("application_name", "options", "target_session_attrs", "sslcert", "sslkey")
LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
HOSTS = (
    st.lists(LABEL, min_size=1, max_size=4).map(".".join)
    | st.ip_addresses(v=4).map(str)
    | st.ip_addresses(v=6).map(str)
)


class StaticSigner:
    """A signer that returns one given token: pure round-trips need no AWS."""

    def __init__(self, token: str) -> None:
        self.token = token

    def sign(self, endpoint: Endpoint, lifetime: float = 900.0) -> SignedToken:
        return SignedToken(self.token, 900.0)


@st.composite
def endpoints(draw: st.DrawFn) -> Endpoint:
    """Endpoints with awkward users, databases, hosts, ports and extra parameters."""
    extra = draw(st.dictionaries(st.sampled_from(EXTRA_KEYS), TEXT, max_size=3))
    hostaddr = draw(st.none() | st.sampled_from(["127.0.0.1", "::1", "10.1.2.3"]))
    return Endpoint(
        draw(HOSTS),
        user=draw(TEXT.filter(str.strip)),
        dbname=draw(TEXT),
        port=draw(st.integers(1, 65535)),
        region="eu-west-3",
        hostaddr=hostaddr,
        **extra,
    )


TOKENS = TEXT | st.sampled_from(["h:5432/?Action=connect&DBUser=a%20b&X-Amz-Signature=+/=?#@"])


def expected(ep: Endpoint, token: str) -> dict[str, str]:
    return {**connect_params(ep), "password": token}


PURE = settings(max_examples=examples(150), deadline=None)


@PURE
@given(ep=endpoints(), token=TOKENS)
def test_conninfo_round_trips_through_libpq_parser(ep: Endpoint, token: str) -> None:
    """libpq's own parser reads back every parameter and the token from conninfo()."""
    text = iampg.conninfo(provider=TokenProvider(ep, signer=StaticSigner(token)))
    assert conninfo_to_dict(text) == expected(ep, token)


@PURE
@given(ep=endpoints(), token=TOKENS)
def test_url_round_trips_through_urllib_and_libpq(ep: Endpoint, token: str) -> None:
    """urllib and libpq both read back the token, user, host, port, dbname and every option."""
    text = iampg.url(provider=TokenProvider(ep, signer=StaticSigner(token)))
    parts = urlsplit(text)
    assert parts.scheme == "postgresql"
    assert unquote(parts.password or "") == token
    assert unquote(parts.username or "") == ep.user
    assert parts.hostname == ep.host
    assert parts.port == ep.port
    assert unquote(parts.path[1:]) == ep.dbname
    query = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)))
    want = expected(ep, token)
    assert query == {
        k: v for k, v in want.items() if k not in {"host", "port", "user", "dbname", "password"}
    }
    assert conninfo_to_dict(text) == want


@PURE
@given(ep=endpoints(), token=TOKENS)
def test_alembic_url_survives_configparser_interpolation(ep: Endpoint, token: str) -> None:
    """ConfigParser (alembic.ini) interpolates alembic_url() back to exactly sqlalchemy_url()."""
    provider = TokenProvider(ep, signer=StaticSigner(token))
    parser = configparser.ConfigParser()
    parser.read_string(f"[alembic]\nsqlalchemy.url = {alembic_url(provider=provider)}\n")
    assert parser["alembic"]["sqlalchemy.url"] == sqlalchemy_url(provider=provider)


@PURE
@given(ep=endpoints(), token=TOKENS, driver=st.sampled_from(["psycopg", "psycopg2", None]))
def test_sqlalchemy_url_round_trips_through_make_url(
    ep: Endpoint, token: str, driver: str | None
) -> None:
    """SQLAlchemy's make_url reads back the token as password and the rest as query."""
    provider = TokenProvider(ep, signer=StaticSigner(token))
    parsed = make_url(sqlalchemy_url(provider=provider, driver=driver))
    assert parsed.drivername == ("postgresql" if driver is None else f"postgresql+{driver}")
    assert parsed.password == token
    assert parsed.username == ep.user
    assert parsed.host == ep.host
    assert parsed.port == ep.port
    query = dict(parsed.query)
    # A name that needs escaping is in the query (SQLAlchemy 2.0 reads the path undecoded).
    assert (parsed.database or query.pop("dbname")) == ep.dbname
    rest = {
        k: v for k, v in connect_params(ep).items() if k not in {"host", "port", "user", "dbname"}
    }
    assert query == rest


def read_pgpass_line(line: str) -> list[str]:
    """Split a .pgpass line the way libpq's passwordFromFile does (escapes, last field)."""
    fields: list[str] = []
    current: list[str] = []
    chars = iter(line)
    for char in chars:
        if char == "\\" and len(fields) < 4:
            current.append(next(chars, ""))
        elif char == "\\":
            following = next(chars, "")
            current.append(following or "\\")
        elif char == ":" and len(fields) < 4:
            fields.append("".join(current))
            current = []
        elif char == ":":
            break  # an unescaped colon ends the password
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


@PURE
@given(ep=endpoints(), token=TOKENS)
def test_pgpass_line_splits_back_into_its_fields(ep: Endpoint, token: str) -> None:
    """libpq's .pgpass splitting rules give back host, port, dbname, user and token."""
    line = pgpass(provider=TokenProvider(ep, signer=StaticSigner(token)))
    assert "\n" not in line
    host, port, dbname, user, password = read_pgpass_line(line)
    assert (host, port, dbname, user, password) == (
        ep.host,
        str(ep.port),
        ep.dbname,
        ep.user,
        token,
    )


@PURE
@given(ep=endpoints(), token=TOKENS)
def test_env_carries_every_parameter(ep: Endpoint, token: str) -> None:
    """env() holds one PG* variable per parameter and the token in PGPASSWORD."""
    out = iampg.env(provider=TokenProvider(ep, signer=StaticSigner(token)))
    assert out["PGPASSWORD"] == token
    assert len(out) == len(expected(ep, token))
    assert {out["PGHOST"], out["PGPORT"], out["PGUSER"], out["PGDATABASE"]} == {
        ep.host,
        str(ep.port),
        ep.user,
        ep.dbname,
    }


# -- libpq itself, through the emulator, with real botocore tokens --------------------------

NAMES = st.text(
    alphabet=st.sampled_from([*SPECIAL, "é", "ß", "日", "x"]), min_size=1, max_size=10
).filter(str.strip)
# PostgreSQL keeps only printable ASCII in application_name (it shows others as "?").
APP_NAMES = st.text(alphabet=st.sampled_from([*SPECIAL, "x"]), min_size=1, max_size=10)
CONNECTING = settings(
    max_examples=examples(12),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NASTY_DB = f"iampg dsn/db?&=:%'\\ é #+@ {os.getpid()}"


@pytest.fixture(scope="module")
def gateway(backend: Backend) -> Iterator[Emulator]:
    """One emulator for the module, with a database whose name needs every kind of escaping."""
    with psycopg.connect(backend.dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(NASTY_DB)))
    try:
        with Emulator(backend.dsn) as emu:
            yield emu
    finally:
        with psycopg.connect(backend.dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(NASTY_DB))
            )


class Role:
    """A login role with an awkward name on the backend, dropped on exit."""

    def __init__(self, backend: Backend, name: str) -> None:
        self.backend = backend
        self.name = f"t{os.getpid()}{name}"

    def __enter__(self) -> str:
        self.backend.ensure_role(self.name, iam=True)  # RDS logs in rds_iam members only
        return self.name

    def __exit__(self, *exc: object) -> None:
        with psycopg.connect(self.backend.dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(self.name)))


def emulator_endpoint(emu: Emulator, user: str, dbname: str, app: str) -> Endpoint:
    return Endpoint(
        emu.host,
        user=user,
        dbname=dbname,
        port=emu.port,
        hostaddr=emu.listen_host,
        region=emu.region,
        sslmode="verify-full",
        sslrootcert=str(emu.ca_file),
        connect_timeout="5",
        application_name=app,
    )


WHO = "select current_user, current_database(), current_setting('application_name')"


def who(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[object, ...] | None:
    return conn.execute(WHO).fetchone()


DBNAMES = st.sampled_from(["postgres", NASTY_DB])


@CONNECTING
@given(name=NAMES, dbname=DBNAMES, app=APP_NAMES)
def test_libpq_connects_with_conninfo_and_url(
    gateway: Emulator, backend: Backend, name: str, dbname: str, app: str
) -> None:
    """libpq logs in through the emulator with conninfo(), url() and alembic's url.

    (alembic_url with driver=None gives the plain postgresql:// scheme libpq reads.)
    """
    with Role(backend, name) as user:
        ep = emulator_endpoint(gateway, user, dbname, app)
        provider = TokenProvider(ep)
        parser = configparser.ConfigParser()
        parser.read_string(f"[a]\nurl = {alembic_url(provider=provider, driver=None)}\n")
        for text in (
            iampg.conninfo(provider=provider),
            iampg.url(provider=provider),
            parser["a"]["url"],
        ):
            with psycopg.connect(text) as conn:
                assert who(conn) == (user, dbname, app)


@CONNECTING
@given(name=NAMES, dbname=DBNAMES, app=APP_NAMES)
def test_libpq_reads_the_pgpass_line(  # noqa: PLR0917 -- fixtures and drawn values
    gateway: Emulator, backend: Backend, name: str, dbname: str, app: str, tmp_path: Path
) -> None:
    """libpq finds the token in a .pgpass file holding pgpass()'s line; no password given."""
    with Role(backend, name) as user:
        ep = emulator_endpoint(gateway, user, dbname, app)
        passfile = tmp_path / "pgpass"
        passfile.write_text("# other lines first\n*:1:*:*:wrong\n" + pgpass(ep) + "\n")
        passfile.chmod(0o600)
        text = make_conninfo(**connect_params(ep), passfile=str(passfile))
        with psycopg.connect(text) as conn:
            assert who(conn) == (user, dbname, app)


@CONNECTING
@given(name=NAMES, dbname=DBNAMES, app=APP_NAMES)
def test_sqlalchemy_connects_with_its_url(
    gateway: Emulator, backend: Backend, name: str, dbname: str, app: str
) -> None:
    """A SQLAlchemy engine made from sqlalchemy_url() logs in as the user, to the database."""
    from sqlalchemy import create_engine, text

    with Role(backend, name) as user:
        engine = create_engine(sqlalchemy_url(emulator_endpoint(gateway, user, dbname, app)))
        try:
            with engine.connect() as conn:
                row = conn.execute(text(WHO)).one()
        finally:
            engine.dispose()
        assert tuple(row) == (user, dbname, app)


@CONNECTING
@given(name=NAMES, dbname=DBNAMES, app=APP_NAMES)
def test_psql_connects_with_env(
    gateway: Emulator, backend: Backend, name: str, dbname: str, app: str
) -> None:
    """psql logs in with nothing but env()'s PG* variables."""
    with Role(backend, name) as user:
        variables = iampg.env(emulator_endpoint(gateway, user, dbname, app))
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        result = subprocess.run(
            [
                "psql",
                "-X",
                "-A",
                "-t",
                "-F",
                "|",
                "-c",
                WHO,
            ],
            env={**clean, **variables},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, "psql failed: " + result.stderr.replace(
            variables["PGPASSWORD"], "<token>"
        )
        assert result.stdout.rstrip("\n") == f"{user}|{dbname}|{app}"


def test_hostaddr_is_kept_in_every_form() -> None:
    """A tunnel's hostaddr survives in url() and sqlalchemy_url(), so they dial the tunnel."""
    ep = Endpoint("db.example.internal", user="u", region="us-east-1", hostaddr="127.0.0.1")
    provider = TokenProvider(ep, signer=StaticSigner("t"))
    assert conninfo_to_dict(iampg.url(provider=provider))["hostaddr"] == "127.0.0.1"
    assert make_url(sqlalchemy_url(provider=provider)).query["hostaddr"] == "127.0.0.1"
    assert ipaddress.ip_address(iampg.env(provider=provider)["PGHOSTADDR"]).is_loopback
