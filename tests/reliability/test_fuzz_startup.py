"""Bad input: random startup packets at the gateway, random argv at the CLI."""

from __future__ import annotations

import contextlib
import io
import random
import socket
import struct
import threading
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iampg
from iampg import cli
from iampg.emulator import Backend, Emulator
from support import (
    PROTOCOL_3,
    endpoint_for,
    examples,
    startup_like,
)

# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


@pytest.fixture(scope="module")
def gateway(backend: Backend) -> Iterator[Emulator]:
    """Return one emulator shared by every burst of this module."""
    with Emulator(backend.dsn) as emu:
        yield emu


def serves(emu: Emulator) -> bool:
    """Tell whether a real psycopg client still logs in through the gateway and queries."""
    with iampg.connect(endpoint_for(emu), wait=0) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


def send_raw(emu: Emulator, payload: bytes, *, read: bool) -> bytes:
    """Send ``payload`` on a fresh socket, optionally read the answer, and close (bounded)."""
    with socket.create_connection((emu.listen_host, emu.port), timeout=2) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(payload)
        if not read:
            return b""
        with contextlib.suppress(OSError):  # half-close: the gateway sees the early end
            sock.shutdown(socket.SHUT_WR)
        try:
            return sock.recv(4096)
        except OSError:  # reset or timed out: the gateway gave up on us, fine
            return b""


@pytest.mark.parametrize("seed", range(4))
def test_random_startup_bursts_leave_the_gateway_serving(gateway: Emulator, seed: int) -> None:
    """After 50 malformed packets and early disconnects, a real client still logs in."""
    rng = random.Random(seed)
    for _ in range(50):
        send_raw(gateway, startup_like(rng), read=rng.random() < 0.5)
    assert serves(gateway)


def test_sessions_keep_working_while_the_gateway_is_fuzzed(gateway: Emulator) -> None:
    """Two open sessions query on while four threads throw 100 bad packets each at the gateway."""
    errors: list[BaseException] = []

    def fuzz(seed: int) -> None:
        rng = random.Random(1000 + seed)
        try:
            for _ in range(100):
                send_raw(gateway, startup_like(rng), read=rng.random() < 0.5)
        except BaseException as exc:
            errors.append(exc)

    answered = 0
    with (
        iampg.connect(endpoint_for(gateway), wait=0) as first,
        iampg.connect(endpoint_for(gateway), wait=0) as second,
    ):
        fuzzers = [threading.Thread(target=fuzz, args=(i,)) for i in range(4)]
        for t in fuzzers:
            t.start()
        while any(t.is_alive() for t in fuzzers):
            for n, conn in enumerate((first, second)):
                assert conn.execute("SELECT %s::int", (n,)).fetchone() == (n,)
                answered += 1
        for t in fuzzers:
            t.join()
    assert not errors
    assert answered >= 2
    assert serves(gateway)


@settings(
    max_examples=examples(40),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=st.binary(max_size=300))
def test_hypothesis_startup_payloads(gateway: Emulator, payload: bytes) -> None:
    """Any byte string as a startup packet gets a protocol error or a close, never a crash."""
    answer = send_raw(gateway, payload, read=True)
    assert not answer or answer[:1] in {b"E", b"N", b"S", b"R"}


def test_gateway_serves_after_hypothesis(gateway: Emulator) -> None:
    """After the hypothesis payloads the gateway still serves, and says why it refused some."""
    for payload in (b"\x00\x00\x00\x08\x00\x01\x00\x00", struct.pack("!I", 2**31) + PROTOCOL_3):
        answer = send_raw(gateway, payload, read=True)
        assert answer[:1] in {b"E", b""}
    assert serves(gateway)


# --- the CLI ---

COMMANDS = ["token", "url", "env", "nosuchcommand", ""]
OPTIONS = [
    "--host",
    "-H",
    "--port",
    "-p",
    "--user",
    "-U",
    "--dbname",
    "--region",
    "--hostaddr",
    "--kind",
    "--sslmode",
    "--sslrootcert",
    "--profile",
    "--help",
    "--bogus",
    "--",
]
VALUES = [
    "db.cluster-abc.us-east-1.rds.amazonaws.com",
    "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws",
    "127.0.0.1",
    "::1",
    "localhost",
    "-1",
    "0",
    "65536",
    "5432",
    "us-east-1",
    "rds",
    "dsql",
    "disable",
    "verify-full",
    "",
    "=",
    "host=127.0.0.1 port=x",
    "postgresql://u@[::1:5432/db",
    "postgresql://u:p@127.0.0.1:99999/db",
    "%zz",
    "\x00",
    "user=\u00e9",
]

argv_items = st.one_of(st.sampled_from(OPTIONS), st.sampled_from(VALUES), st.text(max_size=8))


@settings(max_examples=examples(150), deadline=None)
@given(command=st.sampled_from(COMMANDS), rest=st.lists(argv_items, max_size=6))
def test_cli_random_argv_exits_cleanly(command: str, rest: list[str]) -> None:
    """Any argv gives exit code 0, 1 or 2 and a one-line message: never a traceback."""
    argv = [command, *rest] if command else rest
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except (KeyError, IndexError) as exc:  # pragma: no cover - the failure being tested
            pytest.fail(f"{type(exc).__name__} escaped iampg.cli.main")
    assert code in {0, 1, 2}
    assert "Traceback" not in err.getvalue()
    if code == 0 and command == "token":
        assert out.getvalue().strip()


def test_cli_fuzz_can_fail() -> None:
    """The clean-exit check bites: a usage error exits 2 with a message on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["token", "--port", "65536", "db.invalid"]) in {1, 2}
    assert "iampg" in err.getvalue()


def test_psycopg_error_from_a_closed_gateway_is_operational(backend: Backend) -> None:
    """A gateway that closes mid-startup shows the client an OperationalError, not a hang."""
    with Emulator(backend.dsn) as emu:
        endpoint = endpoint_for(emu)
    with pytest.raises(psycopg.OperationalError):
        iampg.connect(endpoint, wait=0)
