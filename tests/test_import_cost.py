"""``import iampg`` loads the client only: no wire machinery, no proxy, no emulator."""

from __future__ import annotations

import subprocess
import sys


def test_import_iampg_loads_no_wire_proxy_or_emulator() -> None:
    """The wire package, the proxy and the emulator load only when asked for."""
    code = (
        "import sys, iampg; "
        "print(sorted(m for m in sys.modules if m.startswith(("
        "'iampg._wire', 'iampg.proxy', 'iampg.emulator'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"


def test_the_emulator_gateway_uses_the_shared_wire_code() -> None:
    """The emulator's gateway imports the protocol machinery from ``iampg._wire``."""
    code = "import sys, iampg.emulator._gateway; print('iampg._wire.streams' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "True"
