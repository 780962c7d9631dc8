"""Per-service defaults: applied where the caller says nothing, overridable, explained."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

import iampg
from fakes import CountingSigner
from iampg import Endpoint, TokenProvider, _defaults
from iampg._lost import AsyncLivenessCheck, AsyncPurgingCheck, LivenessCheck, PurgingCheck
from iampg._trust import root_file

RDS = Endpoint("mydb.cluster-abc.us-east-1.rds.amazonaws.com", user="app")
DSQL = Endpoint("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws")


def provider(ep: Endpoint) -> TokenProvider:
    return TokenProvider(ep, signer=CountingSigner())


def test_rds_pool_keeps_psycopg_defaults_with_a_finite_connect_timeout() -> None:
    """RDS: TLS verified, a 10 s connect_timeout, psycopg_pool's own sizes."""
    pool = iampg.ConnectionPool(provider=provider(RDS), open=False)
    params = conninfo_to_dict(str(pool.conninfo))
    assert (params["sslmode"], params["connect_timeout"]) == ("verify-full", "10")
    assert (pool.min_size, pool.max_lifetime) == (4, 3600.0)


def test_aurora_serverless_pool_lets_the_cluster_pause() -> None:
    """Aurora Serverless: min_size 0, idle connections closed before the ~5 min cut."""
    pool = iampg.ConnectionPool(provider=provider(RDS), preset="aurora-express", open=False)
    params = conninfo_to_dict(str(pool.conninfo))
    assert int(str(params["connect_timeout"])) > 16  # above the seed's 16 s resume
    assert pool.min_size == 0
    assert pool.max_size == 4
    assert pool.max_idle == 240.0
    assert pool.timeout == 60.0  # above the 45 s connect timeout of a resume


def test_dsql_pool_recycles_under_the_hour_and_checks_at_checkout() -> None:
    """DSQL: max_lifetime 3300 s, a checkout health check, verify-full with the Amazon roots."""
    pool = iampg.ConnectionPool(provider=provider(DSQL), open=False)
    params = conninfo_to_dict(str(pool.conninfo))
    assert pool.max_lifetime == 3300.0
    assert isinstance(pool._check, LivenessCheck)  # a round trip only after idling
    assert isinstance(pool._check, PurgingCheck)  # a loss found also sweeps the idle ones
    assert pool._check.pool is not None
    assert pool._check.pool() is pool
    assert (params["sslmode"], params["sslrootcert"]) == ("verify-full", str(root_file(DSQL)))
    apool = iampg.AsyncConnectionPool(provider=provider(DSQL), open=False)
    assert isinstance(apool._check, AsyncLivenessCheck)
    assert isinstance(apool._check, AsyncPurgingCheck)
    assert apool._check.pool is not None
    assert apool._check.pool() is apool


def test_callers_override_every_default() -> None:
    """What the caller passes wins: sizes, lifetime, check and connect_timeout."""
    ep = DSQL.replace(connect_timeout="3")
    pool = iampg.ConnectionPool(
        provider=provider(ep), max_lifetime=100.0, check=None, min_size=6, open=False
    )
    assert (pool.max_lifetime, pool._check, pool.min_size, pool.max_size) == (100.0, None, 6, 6)
    assert conninfo_to_dict(str(pool.conninfo))["connect_timeout"] == "3"


def test_unknown_or_mismatched_preset_is_a_configuration_error() -> None:
    """A typo in the preset, or dsql for an RDS host, fails early."""
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


def test_every_entry_point_takes_preset() -> None:
    """preset= picks the service defaults of connect-time and pool settings everywhere."""
    from iampg.integrations import django, sqlalchemy

    pool = iampg.ConnectionPool(provider=provider(RDS), preset="aurora-serverless", open=False)
    apool = iampg.AsyncConnectionPool(provider=provider(RDS), preset="Aurora_Express")
    assert (pool.min_size, apool.min_size, apool.max_idle) == (0, 0, 240.0)
    entry = django.database(provider(RDS), preset="aurora-serverless")
    assert entry["OPTIONS"]["connect_timeout"] == "45"
    engine = sqlalchemy.create_engine(provider(RDS), preset="aurora-express")
    engine.dispose()
    with pytest.raises(iampg.ConfigurationError, match="unknown preset"):
        iampg.connect(provider=provider(RDS), preset="aurora")
    with pytest.raises(iampg.ConfigurationError, match="unknown preset"):
        sqlalchemy.create_engine(provider(RDS), preset="aurora")


def test_profile_keyword_still_works_and_warns() -> None:
    """The old profile= keyword picks the same preset, with a DeprecationWarning."""
    with pytest.warns(DeprecationWarning, match="use preset="):
        pool = iampg.ConnectionPool(provider=provider(RDS), profile="aurora-express", open=False)
    assert (pool.min_size, pool.max_idle) == (0, 240.0)
    with pytest.warns(DeprecationWarning, match="use preset="):
        apool = iampg.AsyncConnectionPool(provider=provider(RDS), profile="aurora-serverless")
    assert apool.min_size == 0
    with (
        pytest.warns(DeprecationWarning, match="use preset="),
        pytest.raises(iampg.ConfigurationError, match="disagree"),
    ):
        iampg.connect(provider=provider(RDS), preset="rds", profile="aurora-serverless")


def test_readme_pool_without_max_size_gets_a_sensible_size() -> None:
    """min_size=0 without max_size (the README's first sample) gives max_size 4, no error."""
    pool = iampg.ConnectionPool(provider=provider(RDS), min_size=0, max_idle=240, open=False)
    assert (pool.min_size, pool.max_size, pool.max_idle) == (0, 4, 240)
    apool = iampg.AsyncConnectionPool(provider=provider(RDS), min_size=0)
    assert (apool.min_size, apool.max_size) == (0, 4)


@pytest.mark.parametrize(
    ("sizes", "words"),
    [
        ({"max_size": 0}, "max_size=0 allows no connection: pass max_size=1 or more"),
        ({"min_size": 0, "max_size": 0}, "max_size=0 allows no connection"),
        ({"min_size": 5, "max_size": 2}, "max_size=2 is below min_size=5: pass max_size=5"),
        ({"min_size": -1}, "min_size=-1 is negative: pass min_size=0"),
        ({"max_size": -3}, "allows no connection"),
        ({"min_size": 1.5}, "min_size must be a whole number"),
        ({"max_size": "4"}, "max_size must be a whole number"),
        ({"min_size": True}, "min_size must be a whole number"),
    ],
)
def test_invalid_pool_sizes_are_configuration_errors(sizes: dict[str, Any], words: str) -> None:
    """Each size combination psycopg_pool refuses is a ConfigurationError saying what to pass."""
    with pytest.raises(iampg.ConfigurationError, match=words):
        iampg.ConnectionPool(provider=provider(RDS), open=False, **sizes)
    with pytest.raises(iampg.ConfigurationError, match=words):
        iampg.AsyncConnectionPool(provider=provider(RDS), **sizes)
