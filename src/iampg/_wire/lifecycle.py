"""Running an asyncio server (the emulator's gateway, the proxy) on a loop in its own thread."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import sys
import threading
from typing import TYPE_CHECKING, Literal

from iampg.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from typing_extensions import Self

logger = logging.getLogger("iampg")

EventLoopKind = Literal["auto", "asyncio", "uvloop"]
EVENT_LOOPS: tuple[EventLoopKind, ...] = ("auto", "asyncio", "uvloop")
_uvloop_warned = threading.Event()


def uvloop_installed() -> bool:
    """Tell whether uvloop can be imported (without importing it)."""
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """Return what makes a new event loop of ``kind``.

    ``asyncio``: asyncio's selector loop. ``uvloop``: uvloop's (``pip install iampg[proxy]``).
    ``auto``: uvloop when it is installed and imports, else asyncio's (with a warning when
    uvloop is installed but does not import, e.g. built for another Python).

    Raises:
        ConfigurationError: ``kind`` is unknown, or ``uvloop`` and uvloop cannot be imported.
    """
    if kind not in EVENT_LOOPS:
        choices = ", ".join(EVENT_LOOPS)
        raise ConfigurationError(f"event_loop must be one of {choices}, not {kind!r}")
    if kind == "asyncio" or (kind == "auto" and not uvloop_installed()):
        return asyncio.SelectorEventLoop
    try:
        import uvloop  # noqa: PLC0415 -- optional, and only where asked for
    except ImportError as exc:
        if kind == "auto":
            if not _uvloop_warned.is_set():  # once a process, not once a proxy
                _uvloop_warned.set()
                logging.getLogger("iampg.proxy").warning(
                    "uvloop is installed but cannot be imported (%s): using asyncio", exc
                )
            return asyncio.SelectorEventLoop
        if sys.platform == "win32":
            raise ConfigurationError(
                "event_loop='uvloop': uvloop does not run on Windows"
            ) from None
        raise ConfigurationError(
            f"event_loop='uvloop' needs uvloop: pip install 'iampg[proxy]' ({exc})"
        ) from None
    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new_loop


class BackgroundLoop:
    """Mixin: ``astart()``/``astop()`` run on a new event loop in a daemon thread.

    Also makes the class a context manager, sync (``start()``/``stop()``, which the class
    defines around :meth:`_start_thread` and :meth:`_stop_thread`) and async. The class
    using it sets ``_thread`` and ``_thread_stop`` to None in ``__init__`` and
    ``_loop`` to its running loop in ``astart()`` (None again after ``astop()``).
    """

    _thread_name = "iampg-server"
    #: Makes the thread's loop (a class may set its own, e.g. from :func:`loop_factory`).
    _new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.SelectorEventLoop
    _thread: threading.Thread | None
    _thread_stop: asyncio.Event | None
    _loop: asyncio.AbstractEventLoop | None

    async def astart(self) -> None:
        raise NotImplementedError

    async def astop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    def _start_thread(self) -> None:
        """Start the thread; return once ``astart()`` returned, raising what it raised."""
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = self._new_loop()

        async def main() -> None:
            self._thread_stop = asyncio.Event()
            try:
                await self.astart()
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                ready.set()
            try:
                await self._thread_stop.wait()
            finally:
                await self.astop()

        def run() -> None:
            try:
                loop.run_until_complete(main())
            except BaseException:  # reported to _start_thread() through failure
                if not failure:
                    logger.debug("%s thread failed", self._thread_name, exc_info=True)
            finally:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name=self._thread_name, daemon=True)
        self._thread = thread
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            self._thread = None
            raise failure[0]

    def _stop_thread(self) -> None:
        """Ask the thread's loop to run ``astop()`` and join the thread. Idempotent."""
        thread, loop, stop_event = self._thread, self._loop, self._thread_stop
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may have just closed
                loop.call_soon_threadsafe(stop_event.set)
        thread.join()
        self._thread = None
        self._thread_stop = None
