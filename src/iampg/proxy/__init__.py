"""A local proxy that gives any PostgreSQL client IAM-authenticated sessions.

``iampg proxy`` on the command line, :class:`Proxy` in Python. Not imported by
``import iampg``.
"""

from __future__ import annotations

from ._proxy import ClientTls, Proxy, ProxyStats, SessionInfo

__all__ = ["ClientTls", "Proxy", "ProxyStats", "SessionInfo"]
