"""Tests of the service presets, their overrides, the pure helpers and ``--preset``."""

from __future__ import annotations

import argparse
import itertools
import re
import struct
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iampg import Endpoint
from iampg.emulator import DEFAULT_HOSTNAME, PRESETS, PROFILES, Emulator, Preset, Profile, _cli
from iampg.emulator._serverless import ReadyForQueryScanner, TokenBucket, dsql_hint
from iampg.errors import ConfigurationError

if TYPE_CHECKING:
    from iampg.emulator import Backend


def test_aurora_express_defaults_follow_the_seed() -> None:
    """aurora-express: 300 s auto-pause, 16 s resume that blocks, 3.5 s latency, 300 s idle cut."""
    p = PRESETS["aurora-serverless"]
    assert (p.service, p.auto_pause, p.resume_delay, p.paused_connect) == (
        "rds",
        300.0,
        16.0,
        "wait",
    )
    assert (p.connect_latency, p.idle_timeout, p.idle_notice) == (3.5, 300.0, False)
    assert (p.session_cap, p.max_connections, p.require_sni) == (None, None, False)


def test_dsql_defaults() -> None:
    """dsql: 1-hour cap, 5-minute transactions, 10 000 connections, 100/s burst 1000, SNI."""
    p = PRESETS["dsql"]
    assert (p.service, p.session_cap, p.transaction_limit) == ("dsql", 3600.0, 300.0)
    assert (p.max_connections, p.connection_rate, p.connection_burst) == (10_000, 100.0, 1_000)
    assert (p.require_sni, p.paused_connect, p.auto_pause) == (True, "refuse", None)


def test_rds_profile_has_nothing_timed() -> None:
    """rds: tokens only; nothing on a timer, no limits."""
    p = PRESETS["rds"]
    assert not p.timed
    assert (p.max_connections, p.connection_rate, p.require_sni, p.connect_latency) == (
        None,
        None,
        False,
        0.0,
    )


def test_emulator_profile_and_overrides(backend: Backend) -> None:
    """A profile by name, with keyword overrides, and service=dsql picking the dsql profile."""
    emu = Emulator(backend.dsn, preset="aurora-express", idle_timeout=None, time_scale=60.0)
    assert emu.preset.name == "aurora-serverless"
    assert (emu.preset.idle_timeout, emu.preset.resume_delay) == (None, 16.0)
    assert (emu.service, emu.host, emu.state) == ("rds", DEFAULT_HOSTNAME, "running")
    assert emu.clock.time_scale == 60.0
    dsql = Emulator(backend.dsn, service="dsql", region="eu-west-1")
    assert (dsql.preset.name, dsql.service) == ("dsql", "dsql")
    assert re.fullmatch(r"[a-z0-9]{26}\.dsql\.eu-west-1\.on\.aws", dsql.host)
    endpoint = Endpoint(dsql.host)
    assert (endpoint.kind, endpoint.region) == ("dsql", "eu-west-1")
    custom = Emulator(backend.dsn, preset=Preset(name="mine", session_cap=10.0))
    assert custom.preset.session_cap == 10.0


@pytest.mark.parametrize(
    "spelling", ["aurora-serverless", "aurora-express", "Aurora_Express", " AURORA-SERVERLESS "]
)
def test_every_preset_spelling_is_accepted(backend: Backend, spelling: str) -> None:
    """Emulator(preset=...) and --preset accept every spelling canonical_preset does."""
    assert Emulator(backend.dsn, preset=spelling).preset is PRESETS["aurora-serverless"]  # type: ignore[arg-type]
    parser = argparse.ArgumentParser()
    _cli.add_arguments(parser)
    assert _cli._emulator_kwargs(parser.parse_args(["--preset", spelling]))["preset"] == (
        "aurora-serverless"
    )


def test_profile_is_a_deprecated_alias(
    backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    """profile=, --profile, PROFILES and Profile still work, and the keyword and flag warn."""
    with pytest.warns(DeprecationWarning, match=r"profile=\.\.\.\) is deprecated: use preset="):
        emu = Emulator(backend.dsn, profile="aurora-express")
    assert emu.profile is emu.preset is PRESETS["aurora-serverless"]
    assert PROFILES["aurora-express"] is PROFILES["aurora-serverless"]
    assert Profile is Preset
    with pytest.raises(ConfigurationError, match="not also its old name"):
        Emulator(backend.dsn, preset="rds", profile="rds")
    parser = argparse.ArgumentParser()
    _cli.add_arguments(parser)
    args = parser.parse_args(["--profile", "dsql"])
    assert _cli._emulator_kwargs(args)["preset"] == "dsql"
    assert _cli._user(args) == "admin"
    assert capsys.readouterr().err == (
        "iampg emulate: --profile is deprecated: use --preset dsql\n"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "aurora"}, "unknown preset 'aurora': use one of rds, aurora-serverless"),
        ({"idle_timeout": 0.0}, "idle_timeout must be a positive number"),
        ({"resume_delay": -1.0}, "resume_delay must be a number >= 0"),
        ({"max_connections": 0}, "max_connections must be at least 1"),
        ({"connection_burst": 0}, "connection_burst must be at least 1"),
        ({"paused_connect": "sleep"}, "paused_connect must be 'wait' or 'refuse'"),
        ({"service": "mysql"}, "service must be 'rds' or 'dsql'"),
        ({"bogus": 1}, "unknown preset setting(s): bogus"),
    ],
)
def test_invalid_settings_are_configuration_errors(
    backend: Backend, kwargs: dict[str, object], message: str
) -> None:
    """Bad preset names and values are refused early with a message saying what is wrong."""
    with pytest.raises(ConfigurationError) as info:
        Emulator(backend.dsn, **kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_token_bucket_burst_then_rate() -> None:
    """The bucket allows the burst at once, then refills at the rate, never above the burst."""
    bucket = TokenBucket(rate=100.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.005) is False  # half a token
    assert bucket.take(0.01) is True
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]


def _messages(*items: tuple[bytes, bytes]) -> bytes:
    return b"".join(k + struct.pack("!I", len(b) + 4) + b for k, b in items)


STREAM = _messages(
    (b"S", b"application_name\0\0"),
    (b"K", b"\0\0\0\1\0\0\0\2"),
    (b"Z", b"I"),
    (b"T", b"\0\0"),
    (b"D", b"\0\1\0\0\0\1Z"),  # a data row whose payload looks like a ReadyForQuery
    (b"C", b"SELECT 1\0"),
    (b"Z", b"T"),
    (b"E", b"SERROR\0\0"),
    (b"Z", b"E"),
    (b"Z", b"I"),
)


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_scanner_finds_status_bytes_however_split(cuts: list[int]) -> None:
    """The scanner reports exactly the ReadyForQuery statuses, whatever the chunking."""
    seen: list[bytes] = []
    scanner = ReadyForQueryScanner(seen.append)
    bounds = [0, *sorted(cuts), len(STREAM)]
    for start, end in itertools.pairwise(bounds):
        scanner.feed(STREAM[start:end])
    assert seen == [b"I", b"T", b"E", b"I"]


def test_dsql_hints_never_echo_the_signature() -> None:
    """Hints name the user and action or the reason, never the token's secret parts."""
    token = (
        "h.dsql.us-east-1.on.aws/?Action=DbConnect&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F"
        "20250101%2Fus-east-1%2Fdsql%2Faws4_request&X-Amz-Date=20250101T000000Z"
        "&X-Amz-Expires=900&X-Amz-Signature=" + "ab" * 32
    )
    clock = Emulator("host=127.0.0.1").clock
    hint = dsql_hint("wrong action", token, user="admin", clock=clock)
    assert hint == "Wrong user to action mapping. user: admin, action: DbConnect"
    expired = dsql_hint("token expired", token, user="admin", clock=clock)
    assert expired.startswith("Signature expired: 20250101T000000Z is now earlier than ")
    assert expired.endswith(" - 15 min.)")
    for reason in ("signature mismatch", "unknown access key", "wrong host"):
        text = dsql_hint(reason, token, user="admin", clock=clock)
        assert "ab" * 32 not in text
        assert "AKIA" not in text


def test_cli_preset_option_and_banner(backend: Backend) -> None:
    """--preset reaches the Emulator; the banner shows the behaviour and a DSQL host."""
    parser = argparse.ArgumentParser()
    _cli.add_arguments(parser)
    args = parser.parse_args(["--preset", "dsql"])
    kwargs = _cli._emulator_kwargs(args)
    assert kwargs["preset"] == "dsql"
    assert _cli._user(args) == "admin"
    assert _cli._user(parser.parse_args([])) == "postgres"
    assert "preset" not in _cli._emulator_kwargs(parser.parse_args([]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--preset", "aurora"])
    with Emulator(backend.dsn, **kwargs) as emu:
        banner = _cli._banner(emu, backend, "admin", "postgres")
    assert re.search(r"host name:  [a-z0-9]{26}\.dsql\.us-east-1\.on\.aws\n", banner)
    assert "  preset:     dsql\n" in banner
    assert "sessions closed after 3600 s" in banner
    assert "TLS SNI required" in banner
    assert "aws dsql generate-db-connect-admin-auth-token --hostname " in banner
    with Emulator(backend.dsn, preset="aurora-express") as emu:
        banner = _cli._banner(emu, backend, "postgres", "postgres")
    assert "  preset:     aurora-serverless\n" in banner
    assert "resume takes 16 s (connections wait meanwhile)" in banner
    assert "connect latency 3.5 s" in banner
    assert "idle sessions cut after 300 s (abrupt close)" in banner
    assert "aws rds generate-db-auth-token" in banner
