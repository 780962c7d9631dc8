"""Resolve the documentation's AWS host names to the emulators' addresses (documentation tests).

A page that calls ``docs.use("dns")`` runs its shell blocks with this directory on
``PYTHONPATH``, so every Python process they start (``iampg proxy``, an example program) loads
this module at startup. ``IAMPG_DOCS_RESOLVE="name=address,..."`` then maps each named host
to an address, as the reader's DNS would map it to AWS; other names resolve as usual, and
without the variable nothing changes. Unlike ``PGHOSTADDR``, it does not redirect the
connections that clients of a local proxy make to ``127.0.0.1``.
"""

from __future__ import annotations

import os
import socket
from typing import Any

_getaddrinfo = socket.getaddrinfo


def _names() -> dict[str, str]:
    pairs = (item.split("=", 1) for item in os.environ.get("IAMPG_DOCS_RESOLVE", "").split(","))
    return {pair[0].lower(): pair[1] for pair in pairs if len(pair) == 2}


def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    """:func:`socket.getaddrinfo`, the documentation's host names mapped to their emulators."""
    if isinstance(host, str):
        host = _names().get(host.lower(), host)
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
