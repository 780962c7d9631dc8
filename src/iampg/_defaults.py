"""Per-service connection and pool defaults, each with the reason it exists."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from iampg._endpoint import Endpoint
from iampg.errors import ConfigurationError

__all__ = [
    "PRESETS",
    "PRESET_ALIASES",
    "PROFILES",
    "Preset",
    "Profile",
    "ServiceDefaults",
    "canonical_preset",
    "defaults_for",
    "pool_options",
]

Preset = Literal["rds", "aurora-serverless", "aurora-express", "dsql"]
"""A service preset: how the service behaves and which defaults fit it. ``rds`` (RDS,
provisioned Aurora, RDS Proxy), ``aurora-serverless`` (Aurora Serverless v2, which can pause;
``aurora-express`` is another spelling of it: the express configuration is Aurora Serverless),
``dsql``. The same names are accepted by every entry point: the ``preset=`` keyword, the CLI's
``--preset``, ``iampg emulate --preset`` and the pytest plugin's ``iampg_preset``."""

Profile = Preset
"""Deprecated name of :data:`Preset` ("profile" means an AWS config profile in iampg)."""

PRESETS: tuple[str, ...] = ("rds", "aurora-serverless", "dsql")
"""The canonical preset names."""

PRESET_ALIASES: Mapping[str, str] = MappingProxyType({"aurora-express": "aurora-serverless"})
"""Other spellings a user meets, and the preset each means."""


def canonical_preset(name: str) -> str:
    """Return the canonical name of a preset given in any accepted spelling.

    Case and surrounding blanks are ignored, and ``_`` may stand for ``-``
    (``Aurora_Express`` is ``aurora-serverless``).

    Raises:
        ConfigurationError: No preset has that name; the message lists the accepted ones.
    """
    if not isinstance(name, str):
        raise ConfigurationError(f"a preset name is a string, not {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        accepted = ", ".join([*PRESETS, *PRESET_ALIASES])
        raise ConfigurationError(f"unknown preset {name!r}: use one of {accepted}")
    return key


class ServiceDefaults(NamedTuple):
    """What iampg sets when the caller does not.

    Attributes:
        connect_timeout: libpq ``connect_timeout`` in seconds (libpq's own default waits
            forever).
        pool: psycopg_pool options.
        wait: Seconds :func:`iampg.connect` keeps retrying while the service says it is waking
            up or rate-limiting connections (or, for Aurora Serverless, while a connect times
            out during a resume).
        retry_timeouts: Whether a connect that timed out is worth retrying (a paused Aurora
            Serverless cluster blocks new connections while it resumes).
    """

    connect_timeout: int
    pool: Mapping[str, Any] = MappingProxyType({})
    wait: float = 30.0
    retry_timeouts: bool = False


def _check_connection() -> Any:
    from iampg._lost import LivenessCheck  # noqa: PLC0415 -- psycopg loads on first use

    return LivenessCheck()


PROFILES: Mapping[str, ServiceDefaults] = {
    # Provisioned instances answer at once; 10 s is generous and still fails fast on a
    # wrong address instead of hanging forever.
    "rds": ServiceDefaults(connect_timeout=10),
    # A paused cluster resumes in about 15 s (30 s after a long pause) while the connect
    # blocks, so the timeout must exceed that. Idle connections close after 4 minutes, before
    # Aurora's own idle cut at about 5, and min_size=0 lets the cluster pause (it only pauses
    # with zero connections). A caller waits for a connection up to 60 s (psycopg_pool's 30 s
    # would give up while the first connect after a long pause is still resuming).
    "aurora-serverless": ServiceDefaults(
        connect_timeout=45,
        pool={"min_size": 0, "max_size": 4, "max_idle": 240.0, "timeout": 60.0},
        wait=90.0,
        retry_timeouts=True,
    ),
    # DSQL closes every connection after one hour: recycle by age at 55 minutes, before the
    # cap. psycopg_pool takes up to 5 % off each connection's lifetime (3135-3300 s), so a
    # pool's connections do not all recycle at once, but it looks at that age only when a
    # connection is returned; the checkout check (iampg._lost.LivenessCheck) also refuses one
    # that sat idle past it, and sweeps the pool's other idle ones. The check looks at the
    # socket with one poll() and no round trip: an end of stream or a reset (the cap, an idle
    # cut, a restart) gets the connection refused and replaced without a query; a connection
    # handed out within the last second (RECENT_USE) whose socket is silent gets no query;
    # data waiting (a notice, a FATAL message ahead of its end of stream) or a longer idle
    # time gets a query. The window left: a connection the network drops without a word within
    # that second fails its query, as it would a moment later, and retry_transaction runs it
    # again. Why one second: a busy pool (where a round trip per checkout costs throughput)
    # hands each connection out many times a second, so nearly all its checkouts fall within
    # it, while a quiet pool's connections, idle longer, get the query it can afford. In a busy
    # pool the check is a clock read, a few attribute reads and one poll(): about 4,900
    # instructions of the ~205,000 a checkout and SELECT 1 cost the client (2-3 %). poll()
    # releases the GIL; a probe that keeps it (getsockopt TCP_INFO on a socket object made
    # for libpq's descriptor) cost 2,100 more instructions and a second system call and saved
    # no context switch in a pool of 8 threads, so poll() stayed (docs/performance.md).
    "dsql": ServiceDefaults(
        connect_timeout=10,
        pool={"max_lifetime": 3300.0},
        wait=60.0,
    ),
}


def defaults_for(endpoint: Endpoint, preset: str | None) -> ServiceDefaults:
    """Return the defaults for ``preset``, or for the endpoint's service when it is None.

    Raises:
        ConfigurationError: An unknown preset, or ``dsql`` for a non-DSQL endpoint.
    """
    if preset is None:
        preset = "dsql" if endpoint.kind == "dsql" else "rds"
    preset = canonical_preset(preset)
    if (preset == "dsql") != (endpoint.kind == "dsql"):
        raise ConfigurationError(
            f"preset {preset!r} does not fit a {endpoint.kind} endpoint ({endpoint.host})"
        )
    return PROFILES[preset]


def pool_options(defaults: ServiceDefaults, given: Mapping[str, Any]) -> dict[str, Any]:
    """Merge the preset's pool options under the caller's (the caller wins), sizes checked.

    ``min_size=0`` without ``max_size`` gets the ``aurora-serverless`` preset's ``max_size``
    (a pool that may shrink to nothing still needs room to grow); another ``min_size``
    without ``max_size`` gets psycopg_pool's own rule, ``max_size = min_size``.

    Raises:
        ConfigurationError: ``min_size`` or ``max_size`` is not a size, or they do not fit.
    """
    options = {**defaults.pool, **given}
    if "max_lifetime" in defaults.pool and "check" not in given:
        # Enforce DSQL's hour at checkout too, not only when a connection is returned.
        options["check"] = _check_connection()
    if "min_size" in given and "max_size" not in given:
        # psycopg_pool's own rule (max_size = min_size) rather than a default below min_size.
        options.pop("max_size", None)
    _check_sizes(options)
    return options


_DEFAULT_MIN_SIZE = 4  # psycopg_pool's


def _check_sizes(options: dict[str, Any]) -> None:
    """Fill in ``max_size`` where psycopg_pool would refuse its absence; refuse bad sizes."""
    min_size = options.get("min_size", _DEFAULT_MIN_SIZE)
    max_size = options.get("max_size")
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigurationError(
                f"{name} must be a whole number of connections, not {value!r}: "
                "pass e.g. min_size=0, max_size=4"
            )
    if min_size < 0:
        raise ConfigurationError(
            f"min_size={min_size} is negative: pass min_size=0 (or more) connections to keep open"
        )
    if max_size is None:
        if min_size > 0:
            return  # psycopg_pool: max_size = min_size
        max_size = options["max_size"] = PROFILES["aurora-serverless"].pool["max_size"]
    if max_size < 1:
        raise ConfigurationError(
            f"max_size={max_size} allows no connection: pass max_size=1 or more "
            f"(e.g. min_size={min_size}, max_size={max(min_size, 4)})"
        )
    if max_size < min_size:
        raise ConfigurationError(
            f"max_size={max_size} is below min_size={min_size}: pass max_size={min_size} or "
            f"more, or a smaller min_size"
        )
