"""Tests of the serverless behaviour: auto-pause, shared resume, latency and the idle cut."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import botocore.session
import psycopg
import pytest

from iampg.emulator import Emulator, Event
from support import EmulatorFactory

if TYPE_CHECKING:
    from iampg.emulator import Backend

WAIT = 10.0  # real seconds any background decision may take to show
SCALE = 100.0  # emulated seconds per real second: a 16 s resume takes 0.16 s


# Keep botocore's DEBUG lines (which show signatures) out of failure reports.
pytestmark = pytest.mark.usefixtures("quiet_botocore")


@pytest.fixture
def express(start_emulator: EmulatorFactory) -> Emulator:
    """Return an aurora-express emulator whose 3.5 s latency is off (tests turn it on)."""
    return start_emulator(preset="aurora-express", connect_latency=0.0)


def mint(emu: Emulator) -> str:
    session = botocore.session.get_session()
    creds = emu.credentials
    session.set_credentials(creds.access_key_id, creds.secret_access_key, creds.session_token)
    client = session.create_client("rds", region_name=emu.region)
    token: str = client.generate_db_auth_token(emu.host, emu.port, "postgres")
    return token


def connect(emu: Emulator, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(
        emu.conninfo("postgres", password=mint(emu)), connect_timeout=10, **kwargs
    )


def state(emu: Emulator) -> str:
    """Read the state afresh (other threads change it; keeps mypy from narrowing)."""
    return emu.state


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def events(emu: Emulator, outcome: str) -> list[Event]:
    return [e for e in emu.events if e.outcome == outcome]


@pytest.mark.slow
def test_auto_pause_after_idle_period_with_no_connections(express: Emulator) -> None:
    """With zero connections for auto_pause seconds the cluster pauses, and says why."""
    assert state(express) == "running"
    express.clock.advance(290)  # plus the real seconds elapsed: still short of 300
    time.sleep(0.1)
    assert state(express) == "running"
    express.clock.advance(10)
    wait_until(lambda: state(express) == "paused", "the auto-pause")
    assert [(e.outcome, e.reason) for e in express.events] == [("paused", "idle")]


@pytest.mark.slow
def test_open_connection_keeps_cluster_awake(express: Emulator) -> None:
    """An open connection, even idle, prevents the pause; its close starts the idle clock."""
    with connect(express, autocommit=True) as conn:
        express.clock.advance(250)
        conn.execute("SELECT 1")
        express.clock.advance(250)  # 500 s awake, never idle 300 s: no cut, no pause
        time.sleep(0.1)
        assert state(express) == "running"
        assert conn.execute("SELECT 2").fetchone() == (2,)
    wait_until(lambda: express.connection_count == 0, "the close")
    express.clock.advance(300)
    wait_until(lambda: state(express) == "paused", "the auto-pause")


def test_paused_connect_blocks_until_resumed(backend: Backend) -> None:
    """A connection to a paused Aurora cluster waits the resume delay, then succeeds."""
    with Emulator(backend.dsn, preset="aurora-express", time_scale=SCALE) as emu:
        emu.pause()
        with connect(emu) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert state(emu) == "running"
        resuming, resumed = events(emu, "resuming")[0], events(emu, "resumed")[0]
        assert (resuming.reason, resumed.reason) == ("connection", "resume delay")
        assert resumed.time - resuming.time >= 16.0  # emulated seconds
        assert [e.outcome for e in emu.events][-1] == "accepted"


@pytest.mark.slow
def test_concurrent_connections_share_one_resume(backend: Backend) -> None:
    """Several connections to a paused cluster wait for one and the same resume."""
    with Emulator(
        backend.dsn, preset="aurora-express", time_scale=SCALE, resume_delay=100.0
    ) as emu:
        emu.pause()

        def one(_: int) -> int:
            with connect(emu) as conn:
                row = conn.execute("SELECT 1").fetchone()
                assert row is not None
                return int(row[0])

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(one, range(4))) == [1, 1, 1, 1]
        assert len(events(emu, "resuming")) == 1
        assert len(events(emu, "resumed")) == 1
        assert len(events(emu, "accepted")) == 4


def test_resume_now_releases_waiting_connection(express: Emulator) -> None:
    """emu.resume() ends a resume at once: the waiting connection proceeds."""
    express.pause()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(connect, express)
        wait_until(lambda: state(express) == "resuming", "the resume to start")
        express.resume()
        with future.result(timeout=WAIT) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert events(express, "resumed")[0].reason == "requested"


def test_connect_latency_is_paid_by_every_connection(backend: Backend) -> None:
    """Each connection takes at least connect_latency emulated seconds."""
    with Emulator(backend.dsn, preset="aurora-express", time_scale=SCALE) as emu:
        assert emu.preset.connect_latency == 3.5
        before = emu.clock.now()
        connect(emu).close()
        assert emu.clock.now() - before >= 3.5


def test_idle_session_is_cut_abruptly(express: Emulator) -> None:
    """A session idle for idle_timeout seconds is dropped without a message."""
    conn = connect(express, autocommit=True)
    with conn:
        express.clock.advance(300)
        wait_until(lambda: events(express, "closed"), "the idle cut")
        event = events(express, "closed")[0]
        assert (event.reason, event.sqlstate, event.user) == ("idle timeout", "", "postgres")
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("SELECT 1")
        assert info.value.sqlstate is None  # no server message: the connection just broke


@pytest.mark.slow
def test_idle_cut_with_57p05_notice(backend: Backend) -> None:
    """With idle_notice, the client first gets FATAL 57P05 idle-session timeout."""
    with Emulator(backend.dsn, idle_timeout=60.0, idle_notice=True) as emu:
        conn = connect(emu, autocommit=True)
        with conn:
            emu.clock.advance(60)
            wait_until(lambda: events(emu, "closed"), "the idle cut")
            assert (events(emu, "closed")[0].reason, events(emu, "closed")[0].sqlstate) == (
                "idle timeout",
                "57P05",
            )
            with pytest.raises(psycopg.OperationalError) as info:
                conn.execute("SELECT 1")
            assert info.value.sqlstate == "57P05"
            assert "terminating connection due to idle-session timeout" in str(info.value)


def test_pause_closes_open_sessions(express: Emulator) -> None:
    """emu.pause() with a session open drops it and logs why."""
    conn = connect(express, autocommit=True)
    with conn:
        assert express.session_count == 1
        express.pause()
        assert state(express) == "paused"
        wait_until(lambda: express.connection_count == 0, "the session to close")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert [(e.outcome, e.reason) for e in express.events[-2:]] == [
        ("paused", "requested"),
        ("closed", "paused"),
    ]


@pytest.mark.slow
def test_rds_profile_has_no_timed_behaviour(emulator: Emulator) -> None:
    """The rds profile never pauses or cuts: a day later the session still works."""
    with connect(emulator, autocommit=True) as conn:
        emulator.clock.advance(86_400)
        time.sleep(0.1)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert state(emulator) == "running"
    assert [e.outcome for e in emulator.events] == ["accepted"]
