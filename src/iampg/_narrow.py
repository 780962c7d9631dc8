"""Verify each server with the one CA of its CA file that its certificate chains to.

libpq parses the whole ``sslrootcert`` file on every connection (about 0.33 M instructions
per certificate), but a server's certificate chains to exactly one of them: an RDS instance
to one of its region's three RDS CAs, an Aurora cluster endpoint to one of those or to
Amazon Root CA 1. So iampg learns, per server, which certificate of the file verifies it and
gives libpq a file of that certificate alone.

How it learns, by trial and never by accepting more: each certificate of a file of two to
:data:`MAX_CERTIFICATES` has a file of its own (for iampg's region files, the one-CA files
the store ships, see :func:`iampg._trust.pieces`; for any other file, written once into a
private temporary directory of the process), and a connect tries one of them, in the file's
order, AWS's default CA first in iampg's files. libpq checks the chain during the TLS
handshake, before anything else is sent, so a certificate that does not verify the server
costs one failed handshake and no token; the connect is then made again at once with the
whole file, as it would have been without narrowing, and the next connect tries the next
certificate. A certificate that verified is used from then on; if it stops verifying (the
instance's CA was rotated to another of the set), it is forgotten and the connect made again
with the whole file within the same call. A narrowed file is always a subset of the file
libpq would have read, so narrowing can refuse a server the whole file accepts (at the cost
of that retry), never accept one the whole file refuses.

Bounds: one trial at a time per server (while it runs, other connects to that server use the
whole file, so a pool opening eight connections at once makes one trial); at most
``2 x certificates`` failed narrowed handshakes per server per process, after which the
server keeps the whole file (a reader endpoint that spreads connections over instances with
different CAs); files of more than :data:`MAX_CERTIFICATES` certificates (the system store,
a global bundle) and ``sslrootcert=system`` are used as they are. A server is its host,
address, port and CA file (with the file's size and modification time), so a changed file
starts afresh. A one-certificate file that is gone (a temporary-file cleaner) costs one
connect with the whole file and is written again; where no temporary directory is writable,
nothing is narrowed.

Forks: a child keeps what its parent learned (the same servers; a wrong guess costs one
retry), with fresh locks, no trial in flight and its own temporary directory.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MAX_CERTIFICATES", "Choice", "choose", "forget", "whole_file"]

logger = logging.getLogger("iampg.pool")

MAX_CERTIFICATES = 5
"""The largest CA file narrowed: iampg's own files hold 1 to 5 certificates."""

_MIN_CERTIFICATES = 2  # a file of one certificate is as narrow as it gets
_MAX_BYTES = 64 * 1024 * MAX_CERTIFICATES  # a larger file is no handful of certificates
_MAX_SERVERS = 256  # servers remembered; the oldest is forgotten past that
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)
_VERIFYING = frozenset({"verify-ca", "verify-full"})

_WHOLE = ContextVar("iampg_whole_ca_file", default=False)

Stamp = tuple[int, int, int]
Key = tuple[str, str, str, str, Stamp]


@dataclass
class _Server:
    """What is known of one server: the certificates to try, the one that verified it."""

    pieces: tuple[str, ...]
    learned: int | None = None
    next: int = 0
    trying: bool = False
    misses: int = 0

    @property
    def budget(self) -> int:
        return 2 * len(self.pieces)


class _State:
    """Every server's state and the split files, behind one lock; renewed in a forked child."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.servers: dict[Key, _Server] = {}
        self.pieces: dict[tuple[str, Stamp], tuple[str, ...] | None] = {}
        self.directory: str | None = None
        self.owner = os.getpid()


_state = _State()


def _after_fork_in_child() -> None:
    """Give a forked child fresh locks, no trial in flight, and its own directory."""
    fresh = _State()
    for key, server in _state.servers.items():
        if server.learned is not None:  # kept; its file is made again in the child's directory
            fresh.servers[key] = _Server((), learned=server.learned, misses=server.misses)
    globals()["_state"] = fresh


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Choice:
    """The CA file one connect attempt uses instead of the whole file; say how it went."""

    __slots__ = ("_done", "_server", "file", "index", "trial", "whole")

    def __init__(self, server: _Server, index: int, *, trial: bool, whole: str) -> None:
        self._server = server
        self._done = False
        self.index = index
        self.trial = trial
        self.file = server.pieces[index]
        self.whole = whole

    def verified(self) -> None:
        """The server's certificate verified with :attr:`file` alone: use it from now on."""
        self._finish(learned=True)

    def released(self) -> None:
        """The attempt ended without saying (another failure, cancelled): nothing learned."""
        self._finish(learned=False)

    def refused(self) -> None:
        """The certificate did not verify with :attr:`file`: forget it, try another next.

        A file that is gone (a cleaner emptied the temporary directory) is no verdict on the
        server: the files are written again at the next connect, and nothing is forgotten.
        """
        gone = not os.path.exists(self.file)  # noqa: PTH110
        with _state.lock:
            server = self._server
            if self._done:
                return
            self._done = True
            if gone:
                server.pieces = ()
                server.trying = server.trying and not self.trial
                _state.pieces.clear()
                return
            server.misses += 1
            if self.trial:
                server.trying = False
                server.next = self.index + 1
            elif server.learned == self.index:
                server.learned = None  # a rotation: learn again from the first, within budget
                server.next = 0
        logger.debug(
            "%s did not verify the server (%s): connecting with %s",
            self.file,
            "trial" if self.trial else "rotated",
            self.whole,
        )

    def _finish(self, *, learned: bool) -> None:
        with _state.lock:
            if self._done:
                return
            self._done = True
            if self.trial:
                self._server.trying = False
            if learned and self._server.learned is None:
                self._server.learned = self.index

    def refusal(self, exc: BaseException) -> bool:
        """Tell whether a failed attempt says :attr:`file` did not verify (or is gone)."""
        text = str(exc)
        return "certificate verify failed" in text or self.file in text


def choose(params: Mapping[str, Any]) -> Choice | None:
    """Return the narrower CA file to try for these final libpq parameters, or None.

    None: the parameters do not verify with a CA file of 2 to :data:`MAX_CERTIFICATES`
    certificates, the server's certificate is already known to need the whole file, or
    another connect is finding out right now.
    """
    if params.get("sslmode") not in _VERIFYING or _WHOLE.get():
        return None
    whole = params.get("sslrootcert")
    if not whole or str(whole) == "system":
        return None
    whole = str(whole)
    stamp = _stamp(whole)
    if stamp is None:
        return None
    key: Key = (
        str(params.get("host") or ""),
        str(params.get("hostaddr") or ""),
        str(params.get("port") or ""),
        whole,
        stamp,
    )
    state = _state
    with state.lock:
        server = state.servers.get(key)
        if server is not None and server.pieces:
            return _pick(server, whole)
    pieces = _pieces(whole, stamp)
    if pieces is None:
        return None
    with state.lock:
        server = state.servers.get(key)
        if server is None:
            while len(state.servers) >= _MAX_SERVERS:
                state.servers.pop(next(iter(state.servers)))
            server = state.servers[key] = _Server(pieces)
        elif not server.pieces:
            server.pieces = pieces
        return _pick(server, whole)


def _pick(server: _Server, whole: str) -> Choice | None:
    """Return the attempt's choice for ``server`` (the state lock held)."""
    if server.learned is not None:
        return Choice(server, server.learned, trial=False, whole=whole)
    if server.trying or server.next >= len(server.pieces) or server.misses >= server.budget:
        return None
    server.trying = True
    return Choice(server, server.next, trial=True, whole=whole)


@contextmanager
def whole_file() -> Iterator[None]:
    """Within the block, :func:`choose` narrows nothing: connects use the whole CA file."""
    token = _WHOLE.set(True)
    try:
        yield
    finally:
        _WHOLE.reset(token)


def forget() -> None:
    """Forget every server learned (the split files stay for reuse)."""
    with _state.lock:
        _state.servers.clear()


def _stamp(path: str) -> Stamp | None:
    try:
        info = os.stat(path)  # noqa: PTH116 -- per connect: a Path would cost twice as much
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _pieces(whole: str, stamp: Stamp) -> tuple[str, ...] | None:
    """Return one file per certificate of ``whole``, in its order; None when not narrowed."""
    state = _state
    with state.lock:
        if (whole, stamp) in state.pieces:
            return state.pieces[(whole, stamp)]
    shipped = _shipped_pieces(whole)
    if shipped is not None:
        with state.lock:
            state.pieces[(whole, stamp)] = shipped
        return shipped
    try:
        with open(whole, "rb") as file:  # noqa: PTH123 -- one read, size-limited below
            data = file.read(_MAX_BYTES)
        blocks = [m.group(0) + b"\n" for m in _PEM.finditer(data)]
        if len(data) >= _MAX_BYTES or not _MIN_CERTIFICATES <= len(blocks) <= MAX_CERTIFICATES:
            pieces = None
        else:
            pieces = tuple(_write(block) for block in blocks)
    except OSError as exc:
        logger.debug("CA file %s not narrowed: %s", whole, exc)
        pieces = None
    with state.lock:
        if len(state.pieces) >= _MAX_SERVERS:
            state.pieces.clear()
        state.pieces[(whole, stamp)] = pieces
    return pieces


def _shipped_pieces(whole: str) -> tuple[str, ...] | None:
    """Return the one-CA files iampg ships for one of its own files (nothing written)."""
    from iampg import _trust  # noqa: PLC0415 -- the store's manifest, read once

    return _trust.pieces(whole)


def _write(block: bytes) -> str:
    """Write one certificate to the process's private directory (once); return its path."""
    path = os.path.join(_directory(), hashlib.sha256(block).hexdigest()[:32] + ".pem")  # noqa: PTH118
    if not os.path.exists(path):  # noqa: PTH110
        fd, partial = tempfile.mkstemp(dir=_directory(), suffix=".part")
        with os.fdopen(fd, "wb") as file:
            file.write(block)
        Path(partial).replace(path)
    return path


def _directory() -> str:
    state = _state
    with state.lock:
        if state.directory is None or not os.path.isdir(state.directory):  # noqa: PTH112 -- gone too
            state.directory = tempfile.mkdtemp(prefix="iampg-ca-")  # private: mode 0700
            atexit.register(_remove, state.directory, os.getpid())
        return state.directory


def _remove(directory: str, owner: int) -> None:
    if os.getpid() == owner:  # a forked child leaves its parent's directory alone
        shutil.rmtree(directory, ignore_errors=True)
