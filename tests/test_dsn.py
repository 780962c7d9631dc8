"""conninfo, url and env: tokens encoded so that libpq and URL parsers read them back."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import pytest
from psycopg.conninfo import conninfo_to_dict

import iampg
from fakes import CountingSigner
from iampg import ConfigurationError, Endpoint, TokenProvider

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
    """libpq reads back the token, the other fields, and a TLS default of require."""
    params = conninfo_to_dict(iampg.conninfo(provider=provider()))
    assert params["password"] == NASTY
    assert params["user"] == "app user"
    assert params["dbname"] == "shop/db"
    assert params["sslmode"] == "require"
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
    assert params["sslmode"] == "require"
    assert params["application_name"] == "api"


def test_env_gives_pg_variables() -> None:
    """env() maps every parameter to its PG* variable, the token to PGPASSWORD."""
    out = iampg.env(provider=provider())
    assert out["PGPASSWORD"] == NASTY
    assert out["PGHOST"] == EP.host
    assert out["PGAPPNAME"] == "api"
    assert out["PGSSLMODE"] == "require"


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


def test_env_refuses_parameters_without_a_variable() -> None:
    """A libpq parameter with no PG* variable is an error, not silently dropped."""
    p = provider(EP.replace(keepalives="1"))
    with pytest.raises(ConfigurationError, match="keepalives"):
        iampg.env(provider=p)
