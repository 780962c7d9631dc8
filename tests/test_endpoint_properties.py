"""Endpoint parsing under arbitrary input: an Endpoint or a ConfigurationError, nothing else."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from iampg import ConfigurationError, Endpoint
from support import examples

TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=80)
PIECES = st.sampled_from(
    [
        "postgresql://",
        "postgres://",
        "host=",
        "user=",
        "port=",
        "dbname=",
        "hostaddr=",
        "sslmode=",
        " ",
        "'",
        "\\",
        "@",
        ":",
        "/",
        "?",
        "&",
        "=",
        "%",
        "[",
        "]",
        ",",
        "mydb.cluster-abc.us-east-1.rds.amazonaws.com",
        "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws",
        "127.0.0.1",
        "::1",
        "5432",
        "app",
    ]
)
SPECS = st.one_of(TEXT, st.lists(st.one_of(PIECES, TEXT), max_size=8).map("".join))
OVERRIDES = st.dictionaries(
    st.sampled_from(["user", "port", "dbname", "region", "kind", "hostaddr", "sslmode"]),
    st.one_of(st.none(), TEXT, st.integers(-10, 70000)),
    max_size=4,
)


@settings(max_examples=examples(400), deadline=None)
@given(spec=SPECS, overrides=OVERRIDES)
def test_parse_returns_an_endpoint_or_a_configuration_error(
    spec: str, overrides: dict[str, Any]
) -> None:
    """Whatever the input, parse() gives a valid Endpoint or a ConfigurationError."""
    try:
        ep = Endpoint.parse(spec, **overrides)
    except ConfigurationError as exc:
        assert str(exc)  # noqa: PT017 -- the message must say something
        return
    assert ep.host
    assert ep.user
    assert 0 < ep.port < 65536
    assert ep.kind in {"rds", "dsql"}
    assert ep.region
    assert Endpoint.parse(ep) is ep
    assert ep.replace() == ep


@settings(max_examples=examples(200), deadline=None)
@given(
    environ=st.dictionaries(
        st.sampled_from(
            ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGHOSTADDR", "AWS_REGION", "PGSSLMODE"]
        ),
        TEXT,
        max_size=7,
    )
)
def test_from_env_returns_an_endpoint_or_a_configuration_error(environ: dict[str, str]) -> None:
    """Any environment gives a valid Endpoint or a ConfigurationError."""
    try:
        ep = Endpoint.from_env(environ)
    except ConfigurationError:
        return
    assert ep.host


ANY_TEXT = st.text(alphabet=st.characters(), max_size=20)  # NUL and lone surrogates included
FIELD_VALUES = st.fixed_dictionaries(
    {},
    optional={
        "user": ANY_TEXT,
        "dbname": ANY_TEXT,
        "application_name": ANY_TEXT,
        "sslrootcert": ANY_TEXT,
        "options": ANY_TEXT,
    },
)


@settings(max_examples=300, deadline=None)
@given(host=st.one_of(ANY_TEXT, st.just("db.internal")), fields=FIELD_VALUES)
def test_rendered_connection_strings_read_back_whole(host: str, fields: dict[str, Any]) -> None:
    """Any field text gives a ConfigurationError or a conninfo and URL libpq reads back whole.

    Nothing is cut at a NUL byte, and sslmode and the password always survive.
    """
    from psycopg.conninfo import conninfo_to_dict

    import iampg

    fields.setdefault("user", "app")
    try:
        ep = Endpoint(host, region="us-east-1", sslmode="verify-full", **fields)
    except ConfigurationError as exc:
        assert str(exc)  # noqa: PT017 -- the message must say something
        return
    for text in (iampg.conninfo(ep), iampg.url(ep)):
        back = conninfo_to_dict(text)
        assert back["sslmode"] == "verify-full"
        assert back["password"]
        assert back["host"] == ep.host
        assert back["user"] == ep.user
        assert back["dbname"] == ep.dbname
        for key, value in ep.params.items():
            assert back[key] == value
