"""Endpoint input that libpq would misread: refused at construction, with a clear message."""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
from collections.abc import Callable
from typing import Any

import pytest

import iampg
from iampg import ConfigurationError, Endpoint
from iampg.cli import main

HOST = "mydb.cluster-abc.us-east-1.rds.amazonaws.com"
SECRET = "s3cr3t-value"


def _endpoint() -> Endpoint:
    return Endpoint(HOST, user="app", sslmode="verify-full", application_name="api")


# -- immutability -------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["host", "user", "port", "dbname", "region", "kind", "hostaddr"])
def test_fields_cannot_be_assigned_or_deleted(field: str) -> None:
    """Assigning or deleting any field raises FrozenInstanceError (an AttributeError)."""
    ep = _endpoint()
    with pytest.raises(dataclasses.FrozenInstanceError, match="replace"):
        setattr(ep, field, "x")
    with pytest.raises(AttributeError, match="immutable"):
        delattr(ep, field)
    assert ep == _endpoint()


def test_no_new_attribute_and_params_cannot_be_changed() -> None:
    """No new attribute can be added, and the params view is a copy."""
    ep = _endpoint()
    with pytest.raises(AttributeError):
        ep.token = "x"
    ep.params["sslmode"] = "disable"  # type: ignore[index]
    assert ep.params["sslmode"] == "verify-full"


def test_replace_hash_copy_and_pickle_still_work() -> None:
    """replace() makes a changed copy; hashing, copy and pickle keep equal values."""
    ep = _endpoint()
    other = ep.replace(port=6543)
    assert (other.port, ep.port) == (6543, 5432)
    assert hash(ep) == hash(_endpoint())
    assert copy.copy(ep) == ep
    assert copy.deepcopy(ep) == ep
    restored = pickle.loads(pickle.dumps(ep))
    assert restored == ep
    assert hash(restored) == hash(ep)
    with pytest.raises(AttributeError):
        restored.user = "x"


# -- the constructor takes a host name ------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        f"postgresql://app:{SECRET}@{HOST}/db",
        f"postgres://app@{HOST}",
        f"host={HOST} user=app password={SECRET}",
        f" host = {HOST}",
    ],
)
def test_constructor_given_a_url_says_to_use_parse(spec: str) -> None:
    """Endpoint(url) and Endpoint('host=...') point to Endpoint.parse and echo nothing."""
    with pytest.raises(
        ConfigurationError, match=r"Endpoint\(\) takes a host name.*Endpoint\.parse"
    ) as info:
        Endpoint(spec, user="app", region="us-east-1")
    assert SECRET not in str(info.value)
    assert HOST not in str(info.value)


# -- libpq keywords and sslmode -------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "nearest"),
    [
        ("sslrootcrt", "sslrootcert"),
        ("ssl_mode", "sslmode"),
        ("applicaton_name", "application_name"),
        ("database", "dbname"),
        ("username", "user"),
        ("connect-timeout", "connect_timeout"),
    ],
)
def test_unknown_keyword_names_it_and_the_nearest(key: str, nearest: str) -> None:
    """An unknown libpq keyword in kwargs, a URL query or a conninfo names the nearest one."""
    extra: dict[str, Any] = {key: "x"}
    sources: list[Callable[[], Endpoint]] = [
        lambda: Endpoint(HOST, user="app", **extra),
        lambda: Endpoint.parse(HOST, user="app", **extra),
        lambda: Endpoint.parse(f"postgresql://app@{HOST}/db?{key}=x"),
        lambda: Endpoint.parse(f"host={HOST} user=app {key}=x"),
        lambda: _endpoint().replace(**extra),
    ]
    for make in sources:
        with pytest.raises(ConfigurationError, match=f"{key!r}: did you mean {nearest!r}"):
            make()


def test_unknown_keyword_without_a_near_one() -> None:
    """A keyword like none of libpq's says where the list is."""
    with pytest.raises(ConfigurationError, match=r"'zzzzzz'.*libpq's documentation"):
        Endpoint(HOST, user="app", zzzzzz="1")


def test_every_libpq_keyword_is_known_without_libpq() -> None:
    """The static table holds every keyword this libpq knows (libpq 18's is the superset)."""
    from psycopg import pq

    if pq.version() < 180000:
        pytest.skip("the table is checked against libpq 18 or later")
    known = {o.keyword.decode() for o in pq.Conninfo.get_defaults()}
    assert known <= set(iampg._endpoint.LIBPQ_KEYWORDS)


@pytest.mark.parametrize(
    ("value", "nearest"), [("verify_full", "verify-full"), ("Require", "require")]
)
def test_invalid_sslmode_is_refused_at_construction(value: str, nearest: str) -> None:
    """An sslmode libpq does not know fails when the endpoint is made, naming the nearest."""
    with pytest.raises(ConfigurationError, match=f"sslmode {value!r}.*{nearest!r}"):
        Endpoint(HOST, user="app", sslmode=value)
    with pytest.raises(ConfigurationError, match="sslmode"):
        Endpoint.parse(f"postgresql://app@{HOST}/db?sslmode={value}")
    with pytest.raises(ConfigurationError, match="use one of disable"):
        Endpoint(HOST, user="app", sslmode="bogus")


@pytest.mark.parametrize(
    "mode", ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
)
def test_every_sslmode_is_accepted(mode: str) -> None:
    """Each of libpq's six SSL modes is accepted."""
    assert Endpoint(HOST, user="app", sslmode=mode).params["sslmode"] == mode


# -- bad bytes ------------------------------------------------------------------------------


FIELDS = ["host", "user", "dbname", "region", "hostaddr", "sslrootcert", "application_name"]


def _fields(field: str, value: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"host": HOST, "user": "app", field: value}
    return fields


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize(("bad", "says"), [("\0", "NUL byte"), ("\udcff", "not UTF-8")])
def test_bad_bytes_in_any_field_are_refused(field: str, bad: str, says: str) -> None:
    """A NUL byte or a lone surrogate in any field is a ConfigurationError naming the field."""
    value = {
        "host": f"db{bad}.internal",
        "region": f"us-east-1{bad}",
        "hostaddr": f"127.0.0.1{bad}",
    }
    fields = _fields(field, value.get(field, f"{SECRET}{bad}x"))
    fields.setdefault("region", "us-east-1") if field == "host" else None
    with pytest.raises(ConfigurationError, match=f"{field} .*{says}") as info:
        Endpoint(**fields)
    assert SECRET not in str(info.value)
    spec = fields.pop("host")
    with pytest.raises(ConfigurationError, match=says) as info:
        Endpoint.parse(spec, **fields)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("bad", ["\0", "\udcff"])
def test_bad_bytes_in_a_connection_string_are_refused(bad: str) -> None:
    """A URL or conninfo with a NUL byte or a lone surrogate never reaches libpq cut short."""
    for spec in (
        f"postgresql://app@{HOST}/db{bad}?sslmode=verify-full",
        f"host={HOST} user=app{bad} sslmode=verify-full",
    ):
        with pytest.raises(ConfigurationError, match="the connection string"):
            Endpoint.parse(spec)


@pytest.mark.parametrize(
    "variable", ["PGHOST", "PGUSER", "PGDATABASE", "PGSSLROOTCERT", "AWS_REGION"]
)
@pytest.mark.parametrize(("bad", "says"), [("\0", "NUL byte"), ("\udcff", "not UTF-8")])
def test_bad_bytes_in_the_environment_name_the_variable(variable: str, bad: str, says: str) -> None:
    """from_env() names the variable holding a NUL byte or undecodable bytes."""
    env = {"PGHOST": HOST, "PGUSER": "app", "AWS_REGION": "us-east-1"}
    env[variable] = env.get(variable, "value") + bad
    with pytest.raises(ConfigurationError, match=f"{variable} .*{says}"):
        Endpoint.from_env(env)


@pytest.mark.parametrize("char", ["/", "@", "?", "#", " ", "\t", "=", "'"])
def test_host_with_url_characters_is_refused(char: str) -> None:
    """A host name with '/', '@', '?', '#', '=', a quote or whitespace inside is refused."""
    from psycopg.conninfo import make_conninfo

    host = f"db{char}evil.internal"
    with pytest.raises(ConfigurationError, match=r"host contains|Endpoint\.parse"):
        Endpoint(host, user="app", region="us-east-1")
    with pytest.raises(ConfigurationError, match="host contains"):
        iampg.url(make_conninfo(host=host, user="app", sslmode="verify-full"))


@pytest.mark.parametrize("render", [iampg.url, iampg.conninfo, iampg.env])
def test_renderers_refuse_bad_bytes(render: Any) -> None:
    """iampg.url/conninfo/env raise ConfigurationError for a NUL byte or a lone surrogate."""
    for spec in (f"postgresql://app@{HOST}/db\0x", f"postgresql://app\udcff@{HOST}/db"):
        with pytest.raises(ConfigurationError):
            render(spec)


@pytest.mark.parametrize("command", ["url", "env", "token"])
@pytest.mark.parametrize("variable", ["PGUSER", "PGDATABASE", "PGHOST", "PGSSLROOTCERT"])
def test_cli_reports_undecodable_environment_in_one_line(
    command: str,
    variable: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A variable with undecodable bytes (app\\xff) is a one-line CLI error, exit 2."""
    monkeypatch.setenv("PGHOST", HOST)
    monkeypatch.setenv("PGUSER", "app")
    monkeypatch.setenv(variable, os.fsdecode(b"app\xff"))  # what os.environ gives for it
    assert main([command]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert variable in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["url", "env", "token"])
def test_cli_reports_a_host_with_url_characters_in_one_line(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A host with '/' given on the command line is a one-line CLI error, exit 2."""
    assert main([command, "host='db/x.internal' user=app", "--region", "us-east-1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "host contains" in err
