"""conninfo, url and env: tokens encoded so that libpq and URL parsers read them back."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import iampg
import iampg._dsn
from fakes import CountingSigner
from iampg import ConfigurationError, Endpoint, TokenProvider
from iampg._trust import root_file
from iampg.emulator import Emulator
from support import endpoint_for

NASTY = "h:5432/?Action=connect&DBUser=a%20b&X-Amz-Signature=+/=?#@'\\ x"


class FixedSigner(CountingSigner):
    def sign(self, endpoint: Endpoint, lifetime: float = 900.0) -> iampg.SignedToken:
        super().sign(endpoint, lifetime)
        return iampg.SignedToken(NASTY, 900.0)


EP = Endpoint(
    "mydb.cluster-abc.us-east-1.rds.amazonaws.com",
    user="app user",
    dbname="shop/db",
    application_name="api",
)


def provider(ep: Endpoint = EP) -> TokenProvider:
    return TokenProvider(ep, signer=FixedSigner())


def test_conninfo_round_trips_through_libpq() -> None:
    """libpq reads back the token, the other fields, and a TLS default of verify-full."""
    params = conninfo_to_dict(iampg.conninfo(provider=provider()))
    assert params["password"] == NASTY
    assert params["user"] == "app user"
    assert params["dbname"] == "shop/db"
    assert params["sslmode"] == "verify-full"
    assert params["application_name"] == "api"


def test_url_encodes_everything_and_keeps_parameters() -> None:
    """The URL percent-encodes the token with nothing safe and keeps every parameter."""
    text = iampg.url(provider=provider())
    parts = urlsplit(text)
    assert unquote(parts.password or "") == NASTY
    assert unquote(parts.username or "") == "app user"
    params = conninfo_to_dict(text)
    assert params["password"] == NASTY
    assert params["dbname"] == "shop/db"
    assert (params["sslmode"], params["sslrootcert"]) == ("verify-full", str(root_file(EP)))
    assert params["application_name"] == "api"


def test_env_gives_pg_variables() -> None:
    """env() maps every parameter to its PG* variable, the token to PGPASSWORD."""
    out = iampg.env(provider=provider())
    assert out["PGPASSWORD"] == NASTY
    assert out["PGHOST"] == EP.host
    assert out["PGAPPNAME"] == "api"
    assert (out["PGSSLMODE"], out["PGSSLROOTCERT"]) == ("verify-full", str(root_file(EP)))


def test_insecure_sslmode_to_remote_host_is_refused_before_signing() -> None:
    """sslmode=disable towards a non-loopback host fails without minting a token."""
    signer = FixedSigner()
    p = TokenProvider(EP.replace(sslmode="disable"), signer=signer)
    with pytest.raises(ConfigurationError, match="unencrypted"):
        iampg.conninfo(provider=p)
    assert signer.calls == 0
    assert "password" in conninfo_to_dict(iampg.conninfo(provider=p, allow_insecure=True))


def test_insecure_sslmode_to_loopback_is_allowed() -> None:
    """Plaintext is allowed when the dialled address is this machine (tunnels, emulator)."""
    p = provider(EP.replace(sslmode="prefer", hostaddr="127.0.0.1"))
    assert conninfo_to_dict(iampg.conninfo(provider=p))["sslmode"] == "prefer"


def test_endpoint_must_agree_with_the_provider() -> None:
    """An endpoint naming another host than the provider signs for is refused."""
    with pytest.raises(ConfigurationError, match="differs"):
        iampg.conninfo(EP.replace(port=6000), provider())


def test_a_provider_may_come_first(emulator: Emulator) -> None:
    """``url(provider)``, ``env(provider)`` …: the provider's endpoint, signed by it.

    As the integrations take a provider first; the URL logs in through the emulator.
    """
    p = TokenProvider(endpoint_for(emulator))
    with psycopg.connect(iampg.url(p)) as conn:
        assert conn.execute("select current_user").fetchone() == ("postgres",)
    assert iampg.env(p)["PGHOST"] == emulator.host
    fixed = provider()
    helpers = [
        iampg.conninfo,
        iampg.url,
        iampg.env,
        iampg.pgpass,
        iampg.sqlalchemy_url,
        iampg.alembic_url,
    ]
    for helper in helpers:
        assert helper(fixed) == helper(provider=fixed) == helper(fixed, fixed), helper


def test_a_provider_first_and_another_as_provider_is_refused() -> None:
    """Two different providers cannot both sign: a ConfigurationError, before any signing."""
    first, second = provider(), provider()
    with pytest.raises(ConfigurationError, match="different one as provider="):
        iampg.url(first, second)
    with pytest.raises(ConfigurationError, match="different one as provider="):
        iampg.env(first, provider=second)
    assert first.stats().refreshes == second.stats().refreshes == 0


def test_env_refuses_parameters_without_a_variable() -> None:
    """A libpq parameter with no PG* variable is an error, not silently dropped."""
    p = provider(EP.replace(keepalives="1"))
    with pytest.raises(ConfigurationError, match="keepalives"):
        iampg.env(provider=p)


def test_pgpass_escapes_backslashes_and_colons() -> None:
    """pgpass() escapes \\ and : in every field and leaves the rest of the token alone."""
    line = iampg._dsn.pgpass(provider=provider(EP.replace(dbname="a:b\\c")))
    escaped = NASTY.replace("\\", "\\\\").replace(":", "\\:")
    assert line == f"{EP.host}:5432:a\\:b\\\\c:app user:{escaped}"


def test_pgpass_escapes_a_wildcard_field() -> None:
    """A database literally named * is escaped, so the line does not match every database."""
    line = iampg._dsn.pgpass(provider=provider(EP.replace(dbname="*")))
    assert line.split(":")[2] == "\\*"


def test_pgpass_refuses_line_breaks_without_showing_the_token() -> None:
    """A line break cannot go in a .pgpass line: a clear error that does not quote the value."""
    with pytest.raises(ConfigurationError, match="dbname contains a line break") as info:
        iampg._dsn.pgpass(provider=provider(EP.replace(dbname="a\nb")))
    assert "a\nb" not in str(info.value)

    class NewlineSigner(CountingSigner):
        def sign(self, endpoint: Endpoint, lifetime: float = 900.0) -> iampg.SignedToken:
            return iampg.SignedToken("secret\nvalue", 900.0)

    with pytest.raises(ConfigurationError, match="token contains a line break") as info:
        iampg._dsn.pgpass(provider=TokenProvider(EP, signer=NewlineSigner()))
    assert "secret" not in str(info.value)


def test_alembic_url_doubles_every_percent() -> None:
    """alembic_url() is sqlalchemy_url() with each % doubled; ConfigParser undoes exactly that."""
    import configparser

    from sqlalchemy.engine import make_url

    p = provider()
    text = iampg.alembic_url(provider=p)
    assert text == iampg.sqlalchemy_url(provider=p).replace("%", "%%")
    assert text.startswith("postgresql+psycopg://")  # not psycopg2, which iampg does not use
    parser = configparser.ConfigParser()
    parser.read_string(f"[alembic]\nsqlalchemy.url = {text}\n")
    assert make_url(parser["alembic"]["sqlalchemy.url"]).password == NASTY


def test_sqlalchemy_url_reads_back() -> None:
    """make_url() finds the token, the user, the database and the options in sqlalchemy_url()."""
    from sqlalchemy.engine import make_url

    parsed = make_url(iampg._dsn.sqlalchemy_url(provider=provider()))
    assert parsed.drivername == "postgresql+psycopg"
    assert parsed.password == NASTY
    assert parsed.username == "app user"
    # A name that needs escaping goes in the query: SQLAlchemy 2.0 reads the path undecoded.
    assert not parsed.database
    assert dict(parsed.query) == {
        "dbname": "shop/db",
        "application_name": "api",
        "sslmode": "verify-full",
        "sslrootcert": str(root_file(EP)),
    }
    assert make_url(iampg._dsn.sqlalchemy_url(provider=provider(), driver=None)).drivername == (
        "postgresql"
    )


def test_sqlalchemy_url_refuses_a_bad_driver_before_signing() -> None:
    """A driver name that is not an identifier is refused without minting a token."""
    signer = FixedSigner()
    with pytest.raises(ConfigurationError, match="driver"):
        iampg._dsn.sqlalchemy_url(provider=TokenProvider(EP, signer=signer), driver="psycopg://x")
    assert signer.calls == 0
