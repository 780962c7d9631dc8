"""Which event loop the proxy runs on, and that uvloop's compiled TLS carries the relay."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from iampg import ConfigurationError
from iampg._wire.lifecycle import loop_factory, uvloop_installed
from iampg._wire.streams import native_tls
from iampg.proxy import Proxy
from proxy_support import ProxyFactory, eventually

pytestmark = pytest.mark.usefixtures("quiet_botocore")


def test_an_unknown_event_loop_is_refused_when_the_proxy_is_made(
    emulator_endpoint: object,
) -> None:
    with pytest.raises(ConfigurationError, match="event_loop must be one of auto, asyncio, uv"):
        Proxy(emulator_endpoint, event_loop="trio")  # type: ignore[arg-type]


def test_asyncio_is_asyncio_s_selector_loop() -> None:
    loop = loop_factory("asyncio")()
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop)
        assert not native_tls(loop)  # iampg's TLS layer, with its small buffer
    finally:
        loop.close()


def test_without_uvloop_auto_is_asyncio_and_uvloop_says_what_to_install() -> None:
    """In a process where uvloop cannot be imported (as without the ``proxy`` extra)."""
    code = (
        "import sys; sys.modules['uvloop'] = None\n"
        "import importlib.util, asyncio\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'uvloop' else None\n"
        "from iampg._wire.lifecycle import loop_factory\n"
        "from iampg import ConfigurationError\n"
        "assert loop_factory('auto') is asyncio.SelectorEventLoop\n"
        "try:\n"
        "    loop_factory('uvloop')\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'iampg[proxy]'" in done.stdout


def test_a_uvloop_that_does_not_import_leaves_auto_on_asyncio(tmp_path: Path) -> None:
    """uvloop installed but broken (built for another Python): ``auto`` warns, runs on asyncio.

    ``uvloop`` asked for by name still fails, naming the import error.
    """
    broken = tmp_path / "uvloop"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('undefined symbol: PyFake')\n")
    code = (
        "import asyncio, logging\n"
        "logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "from iampg._wire.lifecycle import loop_factory\n"
        "from iampg import ConfigurationError\n"
        "assert loop_factory('auto') is asyncio.SelectorEventLoop\n"
        "try:\n"
        "    loop_factory('uvloop')\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    assert "WARNING uvloop is installed but cannot be imported" in done.stderr
    assert "undefined symbol: PyFake" in done.stdout


@pytest.mark.skipif(not uvloop_installed(), reason="uvloop is not installed")
def test_auto_is_uvloop_when_installed() -> None:
    import uvloop

    loop = loop_factory("auto")()
    try:
        assert isinstance(loop, uvloop.Loop)
        assert native_tls(loop)
    finally:
        loop.close()


def test_the_upstream_tls_is_the_loop_s_own_on_uvloop_and_iampg_s_on_asyncio(
    emulator_endpoint: object, start_proxy: ProxyFactory, event_loop_kind: str
) -> None:
    """On uvloop the relayed TLS runs in its compiled layer, not asyncio's Python one."""
    proxy = start_proxy(emulator_endpoint)
    with psycopg.connect(proxy.conninfo) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        (session,) = proxy._open
        assert session.upstream is not None
        layer = type(session.upstream.transport).__module__
        if event_loop_kind == "uvloop":
            assert layer.startswith("uvloop")
        else:
            assert layer == "asyncio.sslproto"
    assert eventually(lambda: proxy.stats().closed == 1)
