"""Run one emulator in its own process, so its gateway never competes for the client's GIL."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from typing import Any

from iampg.emulator import Emulator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--service", choices=["rds", "dsql"], default="rds")
    args = parser.parse_args()
    # Clients here dial 127.0.0.1 with verify-full (PgBouncer has no hostaddr): the
    # certificate names the loopback addresses too, which an AWS endpoint's never does.
    kwargs: dict[str, Any] = {"loopback_names": True}
    if args.service == "dsql":
        params = inspect.signature(Emulator).parameters
        if "service" not in params:
            print(json.dumps({"error": "this emulator has no DSQL mode yet"}), flush=True)
            return
        # DSQL's 100 connections/s limit would throttle the connect benchmark: lift it.
        kwargs |= {"service": "dsql", "connection_rate": None}
    with Emulator(args.backend, **kwargs) as emu:
        info = {
            "host": emu.host,
            "port": emu.port,
            "listen_host": emu.listen_host,
            "region": emu.region,
            "ca_file": str(emu.ca_file),
            "service": args.service,
        }
        print(json.dumps(info), flush=True)
        sys.stdout = sys.stderr  # nothing more on the pipe the parent no longer reads
        sys.stdin.read()  # until the parent closes our stdin


if __name__ == "__main__":
    main()
