"""Per-service defaults: applied where the caller says nothing, overridable, explained."""

from __future__ import annotations

import psycopg_pool
import pytest
from psycopg.conninfo import conninfo_to_dict

import iampg
from fakes import CountingSigner
from iampg import Endpoint, TokenProvider, _defaults
from iampg._lost import AsyncPurgingCheck, PurgingCheck

RDS = Endpoint("mydb.cluster-abc.us-east-1.rds.amazonaws.com", user="app")
DSQL = Endpoint("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws")


def provider(ep: Endpoint) -> TokenProvider:
    return TokenProvider(ep, signer=CountingSigner())


def test_rds_pool_keeps_psycopg_defaults_with_a_finite_connect_timeout() -> None:
    """RDS: TLS required, a 10 s connect_timeout, psycopg_pool's own sizes."""
    pool = iampg.ConnectionPool(provider=provider(RDS), open=False)
    params = conninfo_to_dict(str(pool.conninfo))
    assert (params["sslmode"], params["connect_timeout"]) == ("require", "10")
    assert (pool.min_size, pool.max_lifetime) == (4, 3600.0)


def test_aurora_serverless_pool_lets_the_cluster_pause() -> None:
    """Aurora Serverless: min_size 0, idle connections closed before the ~5 min cut."""
    pool = iampg.ConnectionPool(provider=provider(RDS), preset="aurora-express", open=False)
    params = conninfo_to_dict(str(pool.conninfo))
    assert int(str(params["connect_timeout"])) > 16  # above the seed's 16 s resume
    assert pool.min_size == 0
    assert pool.max_size == 4
    assert pool.max_idle == 240.0


def test_dsql_pool_recycles_under_the_hour_and_checks_at_checkout() -> None:
    """DSQL: max_lifetime 3300 s, a checkout health check, verify-full with system roots."""
    pool = iampg.ConnectionPool(provider=provider(DSQL), open=False)
    params = conninfo_to_dict(str(pool.conninfo))
    assert pool.max_lifetime == 3300.0
    assert isinstance(pool._check, PurgingCheck)  # a loss found also sweeps the idle ones
    assert pool._check.check == psycopg_pool.ConnectionPool.check_connection
    assert (params["sslmode"], params["sslrootcert"]) == ("verify-full", "system")
    apool = iampg.AsyncConnectionPool(provider=provider(DSQL), open=False)
    assert isinstance(apool._check, AsyncPurgingCheck)
    assert apool._check.check == psycopg_pool.AsyncConnectionPool.check_connection


def test_callers_override_every_default() -> None:
    """What the caller passes wins: sizes, lifetime, check and connect_timeout."""
    ep = DSQL.replace(connect_timeout="3")
    pool = iampg.ConnectionPool(
        provider=provider(ep), max_lifetime=100.0, check=None, min_size=6, open=False
    )
    assert (pool.max_lifetime, pool._check, pool.min_size, pool.max_size) == (100.0, None, 6, 6)
    assert conninfo_to_dict(str(pool.conninfo))["connect_timeout"] == "3"


def test_unknown_or_mismatched_profile_is_a_configuration_error() -> None:
    """A typo in the profile, or dsql for an RDS host, fails early."""
    with pytest.raises(
        iampg.ConfigurationError,
        match=r"unknown preset 'aurora': use one of rds, aurora-serverless, dsql, aurora-express",
    ):
        iampg.ConnectionPool(provider=provider(RDS), preset="aurora", open=False)
    with pytest.raises(iampg.ConfigurationError, match="does not fit"):
        iampg.ConnectionPool(provider=provider(RDS), preset="dsql", open=False)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("rds", "rds"),
        ("dsql", "dsql"),
        ("aurora-serverless", "aurora-serverless"),
        ("aurora-express", "aurora-serverless"),
        (" Aurora_Express ", "aurora-serverless"),
    ],
)
def test_every_preset_spelling_has_one_canonical_name(given: str, canonical: str) -> None:
    """Each spelling a user meets names one preset; the same function serves every entry point."""
    assert _defaults.canonical_preset(given) == canonical
