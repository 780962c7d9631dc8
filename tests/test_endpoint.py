"""Endpoint parsing: what it accepts, what it infers and what it refuses."""

from __future__ import annotations

from typing import Any

import pytest

from iampg import ConfigurationError, Endpoint


@pytest.mark.parametrize(
    ("host", "region"),
    [
        ("mydb.cluster-c9akciq32.us-east-1.rds.amazonaws.com", "us-east-1"),
        ("mydb.cluster-ro-c9akciq32.eu-west-3.rds.amazonaws.com", "eu-west-3"),
        ("reporting.cluster-custom-c9akciq32.ap-northeast-1.rds.amazonaws.com", "ap-northeast-1"),
        ("mydb-instance-1.c9akciq32.ap-southeast-2.rds.amazonaws.com", "ap-southeast-2"),
        ("myproxy.proxy-c9akciq32.us-west-2.rds.amazonaws.com", "us-west-2"),
        ("ro.endpoint.proxy-c9akciq32.us-west-2.rds.amazonaws.com", "us-west-2"),
        ("mydb.cluster-c9akciq32.cn-north-1.rds.amazonaws.com.cn", "cn-north-1"),
        ("mydb.cluster-c9akciq32.us-gov-west-1.rds.amazonaws.com", "us-gov-west-1"),
        ("MyDB.Cluster-C9AKCIQ32.US-EAST-1.RDS.AMAZONAWS.COM.", "us-east-1"),
    ],
)
def test_rds_hosts_infer_kind_and_region(host: str, region: str) -> None:
    """RDS, Aurora, RDS Proxy, China and GovCloud host names give their region."""
    ep = Endpoint(host, user="app")
    assert ep.kind == "rds"
    assert ep.region == region
    assert ep.host == host.lower().rstrip(".")
    assert ep.port == 5432
    assert ep.dbname == "app"


def test_dsql_host_infers_kind_region_and_defaults() -> None:
    """DSQL host names are kind dsql, user admin and database postgres by default."""
    ep = Endpoint("abcdefghijklmnopqrstuvwxyz.dsql.eu-central-1.on.aws")
    assert (ep.kind, ep.region, ep.user, ep.dbname) == ("dsql", "eu-central-1", "admin", "postgres")


def test_dsql_cluster_id_expands_with_region() -> None:
    """A bare DSQL cluster id plus a region becomes the cluster's host name."""
    ep = Endpoint("abcdefghijklmnopqrstuvwxyz", kind="dsql", region="us-east-2", user="reader")
    assert ep.host == "abcdefghijklmnopqrstuvwxyz.dsql.us-east-2.on.aws"
    assert ep.region == "us-east-2"


def test_parse_url_keeps_every_parameter() -> None:
    """A postgresql:// URL gives host, port, user, dbname and any other libpq parameter."""
    ep = Endpoint.parse(
        "postgresql://app@mydb.cluster-abc.us-east-1.rds.amazonaws.com:6543/shop"
        "?sslmode=verify-full&sslrootcert=/etc/rds.pem&application_name=api"
    )
    assert (ep.user, ep.port, ep.dbname) == ("app", 6543, "shop")
    assert ep.params == {
        "sslmode": "verify-full",
        "sslrootcert": "/etc/rds.pem",
        "application_name": "api",
    }


def test_parse_conninfo_with_overrides_and_hostaddr() -> None:
    """Keyword overrides win over the string; hostaddr separates signing from dialling."""
    ep = Endpoint.parse(
        "host=db.internal user=app dbname=x port=5432",
        region="eu-west-1",
        port=15432,
        hostaddr="127.0.0.1",
    )
    assert (ep.host, ep.region, ep.port, ep.hostaddr) == (
        "db.internal",
        "eu-west-1",
        15432,
        "127.0.0.1",
    )
    assert ep.dialled == "127.0.0.1"
    assert ep.is_loopback


def test_parse_host_and_port() -> None:
    """``host:port`` is accepted as a plain host name with a port."""
    ep = Endpoint.parse("mydb.cluster-abc.us-east-1.rds.amazonaws.com:5433", user="u")
    assert ep.port == 5433


def test_from_env_reads_libpq_and_aws_variables() -> None:
    """PG* variables and AWS_REGION fill an endpoint; the host's own region wins."""
    env = {"PGHOST": "db.internal", "PGUSER": "app", "PGPORT": "7000", "AWS_REGION": "sa-east-1"}
    ep = Endpoint.from_env(env)
    assert (ep.host, ep.user, ep.port, ep.region) == ("db.internal", "app", 7000, "sa-east-1")
    env["PGHOST"] = "mydb.cluster-abc.ca-central-1.rds.amazonaws.com"
    assert Endpoint.from_env(env).region == "ca-central-1"


def test_replace_and_equality() -> None:
    """Endpoints are values: equal when their fields are, and replace() makes a copy."""
    ep = Endpoint("mydb.cluster-abc.us-east-1.rds.amazonaws.com", user="app")
    other = ep.replace(sslmode="verify-full")
    assert other != ep
    assert other.replace(sslmode="require") == ep.replace(sslmode="require")
    assert hash(ep) == hash(Endpoint("mydb.cluster-abc.us-east-1.rds.amazonaws.com", user="app"))


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("", {}, "no host"),
        ("host=", {"user": "a"}, "no host"),
        ("localhost", {"user": "a"}, "cannot infer the AWS region"),
        ("db.example.com", {"user": "a"}, "region='us-east-1'"),
        ("mydb.cluster-abc.us-east-1.rds.amazonaws.com", {}, "no user"),
        ("mydb.cluster-abc.us-east-1.rds.amazonaws.com", {"user": ""}, "user is empty"),
        ("mydb.cluster-abc.us-east-1.rds.amazonaws.com", {"user": "a", "port": 0}, "port"),
        ("mydb.cluster-abc.us-east-1.rds.amazonaws.com", {"user": "a", "port": 65536}, "port"),
        ("mydb.cluster-abc.us-east-1.rds.amazonaws.com", {"user": "a", "port": "x"}, "port"),
        (
            "mydb.cluster-abc.us-east-1.rds.amazonaws.com",
            {"user": "a", "region": "eu-west-1"},
            "contradicts",
        ),
        (
            "mydb.cluster-abc.us-east-1.rds.amazonaws.com",
            {"user": "a", "region": "mars"},
            "not an AWS region",
        ),
        (
            "mydb.cluster-abc.us-east-1.rds.amazonaws.com",
            {"user": "a", "kind": "mysql"},
            "kind must be",
        ),
        (
            "mydb.cluster-abc.us-east-1.rds.amazonaws.com",
            {"user": "a", "hostaddr": "db"},
            "IP address",
        ),
        (
            "postgresql://a:secret@mydb.cluster-abc.us-east-1.rds.amazonaws.com/x",
            {},
            "remove the password",
        ),
        ("host=a,b user=x", {"region": "us-east-1"}, "several hosts"),
        ("host=/var/run/postgresql user=x", {"region": "us-east-1"}, "Unix socket"),
        ("host='unterminated", {}, "cannot parse"),
        ("shortid", {"kind": "dsql", "region": "us-east-1"}, "DSQL cluster id"),
        ("abcdefghijklmnopqrstuvwxyz", {"kind": "dsql"}, "needs region"),
    ],
)
def test_bad_input_raises_configuration_error(
    spec: str, kwargs: dict[str, Any], message: str
) -> None:
    """Bad input raises ConfigurationError saying what to supply, never a bare traceback."""
    with pytest.raises(ConfigurationError, match=message) as info:
        Endpoint.parse(spec, **kwargs)
    assert "secret" not in str(info.value)


def test_configuration_error_is_a_value_error_under_iampg_error() -> None:
    """Configuration mistakes can be caught as iampg.Error or ValueError."""
    import iampg

    with pytest.raises(iampg.Error):
        Endpoint("")
    with pytest.raises(ValueError):
        Endpoint("")
