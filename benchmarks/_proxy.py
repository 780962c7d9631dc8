"""Run ``iampg.proxy.Proxy`` in its own process, as ``iampg proxy`` runs; optionally profiled.

The parent gives the emulator's endpoint as JSON on the command line, reads one JSON line
(``host``, ``port``, ``conninfo``, or ``error``) and stops the proxy by closing its stdin.
``--event-loop`` picks the loop as ``iampg proxy --event-loop`` does (default: ``auto``,
uvloop when installed).
``--profile FILE`` runs the proxy's event loop under cProfile and writes the statistics
(``pstats`` format) to ``FILE`` on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import sys
from typing import Any

from iampg import Endpoint
from iampg._wire.lifecycle import EVENT_LOOPS, loop_factory


async def _serve(endpoint: Endpoint) -> None:
    try:
        from iampg.proxy import Proxy  # noqa: PLC0415
    except ImportError as exc:
        print(json.dumps({"error": f"iampg.proxy is not available: {exc}"}), flush=True)
        return
    async with Proxy(endpoint) as proxy:
        loop = asyncio.get_running_loop()
        kind = "asyncio" if isinstance(loop, asyncio.BaseEventLoop) else type(loop).__module__
        info = {
            "host": proxy.host,
            "port": proxy.port,
            "conninfo": proxy.conninfo,
            "event_loop": kind,
        }
        print(json.dumps(info), flush=True)
        sys.stdout = sys.stderr  # nothing more on the pipe the parent no longer reads
        # Until the parent closes our stdin; the read runs in a thread, the relay on this loop.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True, help="Endpoint fields as JSON")
    parser.add_argument("--profile", help="write cProfile statistics of the loop here")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto")
    args = parser.parse_args()
    fields: dict[str, Any] = json.loads(args.endpoint)
    endpoint = Endpoint(fields.pop("host"), **fields)
    loop = loop_factory(args.event_loop)()  # as `iampg proxy --event-loop` makes it
    try:
        if not args.profile:
            loop.run_until_complete(_serve(endpoint))
            return
        profiler = cProfile.Profile()
        try:
            profiler.runcall(loop.run_until_complete, _serve(endpoint))
        finally:
            profiler.dump_stats(args.profile)
    finally:
        loop.close()


if __name__ == "__main__":
    main()
