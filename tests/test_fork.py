"""Fork safety: a provider or signer inherited across os.fork() works in the child; a pool is
never shared with it.

Each test holds a lock of the parent in another thread (a signer blocked mid-signing) while it
forks: the child inherits the lock held, by a thread that does not exist there. The child
reports through a pipe; the parent waits a bounded time and kills a child that hangs.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import botocore.credentials
import psycopg
import pytest

import iampg
from iampg import AwsSigner, Endpoint, SignedToken, TokenProvider, _aws
from iampg.emulator import Emulator
from support import endpoint_for

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    # Python 3.12+ warns about forking a process that has threads: that is the point here.
    pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning"),
]

EP = Endpoint("mydb.cluster-abc.us-east-1.rds.amazonaws.com", user="app")
CHILD_DEADLINE = 10.0  # seconds the child has to report; a deadlocked child never does


class GatedSigner:
    """A signer that stops mid-signing until ``release`` is set, in the parent process only."""

    def __init__(self) -> None:
        self.parent = os.getpid()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def sign(self, endpoint: Endpoint, lifetime: float = 900.0) -> SignedToken:
        self.calls += 1
        if os.getpid() == self.parent:
            self.entered.set()
            self.release.wait(30)
        return SignedToken(f"token-{os.getpid()}-{self.calls}-{endpoint.user}", 900.0)


class GatedSession:
    """A session whose credentials lookup blocks until ``release``, in the parent only."""

    def __init__(self) -> None:
        self.parent = os.getpid()
        self.entered = threading.Event()
        self.release = threading.Event()

    def get_credentials(self) -> botocore.credentials.Credentials:
        if os.getpid() == self.parent:
            self.entered.set()
            self.release.wait(30)
        return botocore.credentials.Credentials(
            "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
        )


def in_child(work: Callable[[], str]) -> str:
    """Fork; run ``work`` in the child and return what it reported (or fail on a hang)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running any of pytest's teardown
        code = 0
        try:
            os.close(read)
            os.write(write, work().encode())
        except BaseException as exc:  # reported to the parent, never raised here
            os.write(write, f"error: {type(exc).__name__}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], CHILD_DEADLINE)
        answer = os.read(read, 4096).decode() if ready else ""
    finally:
        os.close(read)
        reap(pid)
    assert answer, f"the child did not report within {CHILD_DEADLINE:g} s (deadlocked)"
    return answer


def reap(pid: int) -> None:
    """Wait for the child a bounded time; kill it if it is still running."""
    deadline = time.monotonic() + CHILD_DEADLINE
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.fixture
def held() -> Iterator[list[threading.Thread]]:
    """Collect the parent's blocked threads; join them after the test."""
    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join(30)


def start(threads: list[threading.Thread], target: Callable[[], object]) -> None:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    threads.append(thread)


def test_lazy_provider_works_in_a_child_forked_mid_signing(held: list[threading.Thread]) -> None:
    """A thread of the parent is signing (holding the lock) at the fork: the child signs."""
    signer = GatedSigner()
    provider = TokenProvider(EP, signer=signer)
    start(held, provider.token)
    assert signer.entered.wait(10)

    def work() -> str:
        return provider.token()

    try:
        answer = in_child(work)
    finally:
        signer.release.set()
    assert answer.startswith("token-")
    assert answer != f"token-{os.getpid()}-1-app"  # signed in the child, not inherited
    assert provider.token() == f"token-{os.getpid()}-1-app"  # the parent is unaffected


def test_ahead_provider_restarts_its_refresher_in_the_child(
    held: list[threading.Thread],
) -> None:
    """The ahead refresher is mid-signing at the fork: the child gets a token and a refresher."""
    signer = GatedSigner()
    provider = TokenProvider(EP, signer=signer, refresh="ahead")
    assert signer.entered.wait(10)  # the background thread is signing the first token

    def work() -> str:
        token = provider.token()
        ahead = provider._ahead
        alive = ahead is not None and ahead.is_alive()
        provider.close()
        return f"{token.split('-')[1] == str(os.getpid())} {alive}"

    try:
        answer = in_child(work)
    finally:
        signer.release.set()
        provider.close()
    assert answer == "True True"


def test_aws_signer_works_in_a_child_forked_while_resolving(
    held: list[threading.Thread],
) -> None:
    """A thread of the parent holds the signer's lock resolving credentials: the child signs."""
    session = GatedSession()
    signer = AwsSigner(session=session)
    start(held, lambda: signer.sign(EP))
    assert session.entered.wait(10)

    def work() -> str:
        return "signed" if "X-Amz-Signature=" in signer.sign(EP).token else "unsigned"

    try:
        assert in_child(work) == "signed"
    finally:
        session.release.set()


def test_shared_registry_works_in_a_child_forked_while_it_was_locked(
    held: list[threading.Thread],
) -> None:
    """The registry of shared signers was locked by another thread at the fork: not in the child."""
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _aws._shared_lock:
            locked.set()
            release.wait(30)

    start(held, hold)
    assert locked.wait(10)

    def work() -> str:
        return repr(AwsSigner.shared(profile="child"))

    try:
        assert in_child(work) == "AwsSigner(profile='child')"
    finally:
        release.set()


# -- pools are never shared across a fork -------------------------------------------------


def _pid_of(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def test_pool_opened_before_a_fork_is_refused_in_the_child(emulator: Emulator) -> None:
    """The child cannot take the parent's connections; closing there leaves them working."""
    provider = TokenProvider(endpoint_for(emulator))
    with iampg.ConnectionPool(provider=provider, min_size=1, max_size=1, open=True) as pool:
        with pool.connection() as conn:
            before = _pid_of(conn)

        def work() -> str:
            try:
                with pool.connection() as conn:
                    return f"used the parent's connection {_pid_of(conn)}"
            except iampg.ConfigurationError as exc:
                refused = "opened in process" in str(exc) and "after the fork" in str(exc)
            pool.close()  # e.g. an atexit hook: must not end the parent's session
            return f"refused {refused}"

        assert in_child(work) == "refused True"
        with pool.connection() as conn:
            assert _pid_of(conn) == before  # the parent's session survived the child


def test_pool_made_closed_before_a_fork_opens_in_the_child(emulator: Emulator) -> None:
    """``open=False`` before the fork, opened in the child: the child's own connections."""
    provider = TokenProvider(endpoint_for(emulator))
    pool = iampg.ConnectionPool(provider=provider, min_size=1, max_size=1, open=False)

    def work() -> str:
        with pool, pool.connection() as conn:
            return str(_pid_of(conn))

    assert int(in_child(work)) > 0
    with pool, pool.connection() as conn:  # and the parent opens its own
        assert _pid_of(conn) > 0


def test_async_pool_opened_before_a_fork_is_refused_in_the_child(emulator: Emulator) -> None:
    """The asynchronous pool refuses the same way, and its close() in the child is harmless."""
    provider = TokenProvider(endpoint_for(emulator))

    async def parent() -> tuple[int, str, int]:
        async with iampg.AsyncConnectionPool(provider=provider, min_size=1, max_size=1) as pool:
            async with pool.connection() as conn:
                row = await (await conn.execute("select pg_backend_pid()")).fetchone()
                before = int(row[0]) if row else 0

            async def child() -> str:
                try:
                    async with pool.connection():
                        return "used the parent's connection"
                except iampg.ConfigurationError:
                    await pool.close()
                    return "refused"

            answer = in_child(lambda: asyncio.run(child()))
            async with pool.connection() as conn:
                row = await (await conn.execute("select pg_backend_pid()")).fetchone()
                after = int(row[0]) if row else -1
        return before, answer, after

    before, answer, after = asyncio.run(parent())
    assert answer == "refused"
    assert before == after


def test_psycopg2_pool_made_before_a_fork_is_refused_in_the_child(emulator: Emulator) -> None:
    """psycopg2's pool (iampg's subclass) refuses the child too; closeall() there is harmless."""
    iampg_psycopg2 = pytest.importorskip("iampg.integrations.psycopg2")
    pool = iampg_psycopg2.ThreadedConnectionPool(1, 1, TokenProvider(endpoint_for(emulator)))
    try:
        conn = pool.getconn()
        with conn.cursor() as cur:
            cur.execute("select pg_backend_pid()")
            before = cur.fetchone()[0]
        pool.putconn(conn)

        def work() -> str:
            try:
                pool.getconn()
            except iampg.ConfigurationError as exc:
                pool.closeall()  # must not end the parent's session
                return f"refused {'before a fork' in str(exc)}"
            return "used the parent's connection"

        assert in_child(work) == "refused True"
        conn = pool.getconn()
        with conn.cursor() as cur:
            cur.execute("select pg_backend_pid()")
            assert cur.fetchone()[0] == before
        pool.putconn(conn)
    finally:
        pool.closeall()
