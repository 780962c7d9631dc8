"""Fixtures for the proxy's tests: proxies in front of the emulator, stopped after the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from contextlib import ExitStack
from typing import Any

import pytest

from iampg import Endpoint
from iampg.emulator import Emulator
from iampg.proxy import Proxy
from proxy_support import ProxyFactory
from support import endpoint_for


@pytest.fixture(autouse=True)
def _quiet(quiet_botocore: None) -> None:
    """Keep botocore's DEBUG lines (which show signatures) out of failure reports."""


@pytest.fixture
def start_proxy() -> Iterator[ProxyFactory]:
    """Return a factory of running proxies (``Proxy``'s arguments), stopped after the test."""
    with ExitStack() as running:

        def start(endpoint: Endpoint | str, **options: Any) -> Proxy:
            options.setdefault("grace", 0.0)
            return running.enter_context(Proxy(endpoint, **options))

        yield start


@pytest.fixture
def proxy(emulator: Emulator, start_proxy: ProxyFactory) -> Proxy:
    """Return a running proxy in front of the RDS-mode emulator, user postgres."""
    return start_proxy(endpoint_for(emulator))


@pytest.fixture
def emulator_endpoint(emulator: Emulator) -> Endpoint:
    """Return the endpoint of the RDS-mode emulator, user postgres."""
    return endpoint_for(emulator)


@pytest.fixture
def emulator_endpoint_proxy(
    emulator_endpoint: Endpoint, start_proxy: ProxyFactory, tmp_path: Path
) -> Proxy:
    """Return a running proxy that also listens on a Unix socket in a temporary directory."""
    return start_proxy(emulator_endpoint, unix_socket_dir=tmp_path)
