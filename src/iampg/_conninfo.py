"""libpq connection strings (``key=value`` and URLs), read and written without libpq if need be.

psycopg's functions (libpq's own parser) are used where psycopg can be imported; elsewhere (an
image with asyncpg only, or without libpq) a parser that follows libpq's rules reads the same
strings, so the token core never needs libpq.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from iampg.errors import ConfigurationError

__all__ = ["make", "parse", "parse_python"]

_SPACE = re.compile(r"\s")
_ESCAPE = re.compile(r"([\\'])")
_URI_PREFIXES = ("postgresql://", "postgres://")

_psycopg: Any = None  # psycopg.conninfo once imported; False where it cannot be


def _libpq() -> Any:
    """Return :mod:`psycopg.conninfo`, or None where psycopg cannot be imported."""
    global _psycopg  # noqa: PLW0603 -- a cache of one import attempt
    if _psycopg is None:
        try:
            import psycopg.conninfo  # noqa: PLC0415 -- psycopg loads on first use
        except ImportError:
            _psycopg = False
        else:
            _psycopg = psycopg.conninfo
    return _psycopg or None


def parse(text: str) -> dict[str, str]:
    """Return the parameters of a ``key=value`` string or ``postgresql://`` URL.

    Raises:
        ConfigurationError: The string cannot be parsed (libpq's reason quoted).
    """
    if not text or text.isspace():
        return {}  # what every pool connection's check parses: no need to ask libpq
    libpq = _libpq()
    if libpq is None:
        return parse_python(text)
    import psycopg  # noqa: PLC0415 -- loaded by _libpq already

    try:
        params: dict[str, Any] = libpq.conninfo_to_dict(text)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"cannot parse the connection string: {exc}") from None
    return {k: str(v) for k, v in params.items() if v is not None}


def make(**params: Any) -> str:
    """Return a ``key=value`` string of ``params`` (``None`` values left out), as psycopg would."""
    libpq = _libpq()
    if libpq is not None:
        text: str = libpq.make_conninfo(**params)
        return text
    text = " ".join(f"{k}={_quote(str(v))}" for k, v in params.items() if v is not None)
    parse_python(text)  # refuse what libpq would refuse
    return text


def _quote(value: str) -> str:
    """Quote a value the way psycopg's ``make_conninfo`` does."""
    if not value:
        return "''"
    value = _ESCAPE.sub(r"\\\1", value)
    return f"'{value}'" if _SPACE.search(value) else value


def parse_python(text: str) -> dict[str, str]:
    """Parse like libpq's ``PQconninfoParse``, in Python.

    Raises:
        ConfigurationError: What libpq would refuse, with libpq's wording.
    """
    stripped = text.lstrip()
    if stripped.startswith(_URI_PREFIXES):
        return _parse_uri(stripped)
    return _parse_pairs(text)


def _fail(reason: str) -> ConfigurationError:
    return ConfigurationError(f"cannot parse the connection string: {reason}")


def _known(key: str, *, uri: bool) -> str:
    from iampg._endpoint import LIBPQ_KEYWORDS  # noqa: PLC0415 -- _endpoint imports this module

    if key not in LIBPQ_KEYWORDS:
        raise _fail(
            f'invalid URI query parameter: "{key}"' if uri else f'invalid connection option "{key}"'
        )
    return key


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _parse_pairs(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    i = _skip_space(text, 0)
    while i < len(text):
        start = i
        while i < len(text) and not text[i].isspace() and text[i] != "=":
            i += 1
        key = text[start:i]
        i = _skip_space(text, i)
        if i >= len(text) or text[i] != "=":
            raise _fail(f'missing "=" after "{key}" in connection info string')
        value, i = _read_value(text, _skip_space(text, i + 1))
        params[_known(key, uri=False)] = value
        i = _skip_space(text, i)
    return params


def _read_value(text: str, i: int) -> tuple[str, int]:
    """Read a value at ``i``: quoted (``'…'``) or up to a blank; a backslash escapes."""
    quoted = i < len(text) and text[i] == "'"
    i += quoted
    value: list[str] = []
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            value.append(text[i + 1])
            i += 2
            continue
        if (quoted and char == "'") or (not quoted and char.isspace()):
            return "".join(value), i + quoted
        value.append(char)
        i += 1
    if quoted:
        raise _fail("unterminated quoted string in connection info string")
    return "".join(value), i


def _decode(part: str) -> str:
    if re.search(r"%(?![0-9A-Fa-f]{2})", part):
        raise _fail(f'invalid percent-encoded token: "{part}"')
    decoded = unquote(part, errors="strict")
    if "\0" in decoded:
        raise _fail(f'forbidden value %00 in percent-encoded value: "{part}"')
    return decoded


def _parse_uri(text: str) -> dict[str, str]:
    prefix = next(p for p in _URI_PREFIXES if text.startswith(p))
    rest = text[len(prefix) :]
    params: dict[str, str] = {}
    head = re.match(r"[^@/?]*@", rest)
    if head is not None:
        user, sep, password = head.group(0)[:-1].partition(":")
        if user:
            params["user"] = _decode(user)
        if sep and password:
            params["password"] = _decode(password)
        rest = rest[head.end() :]
    hosts, ports, rest = _read_hosts(rest, text)
    if any(hosts):
        params["host"] = ",".join(hosts)
    if any(ports):
        params["port"] = ",".join(ports)
    path, _, query = rest.partition("?")
    if path.startswith("/") and path[1:]:
        params["dbname"] = _decode(path[1:])
    params.update(_read_query(query))
    return params


def _read_query(query: str) -> dict[str, str]:
    """Read a URI's ``key=value&…`` parameters, percent-decoded."""
    params: dict[str, str] = {}
    for pair in query.split("&") if query else ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise _fail(f'missing key/value separator "=" in URI query parameter: "{pair}"')
        if "=" in value:
            raise _fail(f'extra key/value separator "=" in URI query parameter: "{pair}"')
        key, value = _decode(key), _decode(value)
        if key == "ssl" and value == "true":
            key, value = "sslmode", "require"
        params[_known(key, uri=True)] = value
    return params


def _read_hosts(rest: str, text: str) -> tuple[list[str], list[str], str]:
    """Read ``host[:port][,host[:port]…]``; return the hosts, the ports and what follows."""
    hosts: list[str] = []
    ports: list[str] = []
    while True:
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                raise _fail(f'missing "]" after an IPv6 host address in URI: "{text}"')
            host, rest = rest[1:end], rest[end + 1 :]
            if not host:
                raise _fail(f'IPv6 host address may not be empty in URI: "{text}"')
        else:
            host = re.match(r"[^:/?,]*", rest).group(0)  # type: ignore[union-attr]
            rest = rest[len(host) :]
            host = _decode(host)
        port = ""
        if rest.startswith(":"):
            port = re.match(r":([^/?,]*)", rest).group(1)  # type: ignore[union-attr]
            rest = rest[len(port) + 1 :]
            port = _decode(port)
        hosts.append(host)
        ports.append(port)
        if not rest.startswith(","):
            break
        rest = rest[1:]
    if rest and rest[0] not in "/?":
        raise _fail(f'unexpected character "{rest[0]}" in URI: "{text}"')
    return hosts, ports, rest
