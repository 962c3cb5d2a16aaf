"""Who may call what on the router, the way SGLang 0.5.23 guards its own HTTP server (`sglang/srt/utils/auth.py`):
bearer tokens compared in constant time, two keys, health and metrics always open (probes, Prometheus).

- `--api-key` (clients): when set, every other endpoint needs `Authorization: Bearer <api key>` (or the admin key:
  an operator may do what a client may).
- `--admin-api-key` (operators): `POST /ares/migrate`, `POST /flush_cache` and the `X-Ares-Decode` pin of a
  generation request need it when it is set. Without one, these are open to loopback clients only (the default
  loopback cluster keeps working; a router bound to a public address does not hand them to the network). SGLang
  refuses its ADMIN_FORCE endpoints outright without an admin key; the router has no endpoint that must stay shut
  on loopback.

Refusals are 401 (no or wrong key) and 403 (an admin action from another host without an admin key), in the
OpenAI error shape. The decision is a pure function (`decide`), unit-tested without a server.
"""

from __future__ import annotations

import ipaddress
import secrets
from enum import Enum

from ares_router.protocol import APIError

ADMIN_PATHS = frozenset({"/ares/migrate", "/flush_cache"})
OPEN_PREFIXES = ("/health", "/metrics")  # as SGLang: probes and scrapers carry no secret


class Level(str, Enum):
    """What a request does, as far as keys go."""

    OPEN = "open"
    CLIENT = "client"
    ADMIN = "admin"


def level_of(path: str, pinned: bool) -> Level:
    """The level of a request to `path` (`pinned`: it names a decode server with `X-Ares-Decode`)."""
    if path.startswith(OPEN_PREFIXES):
        return Level.OPEN
    if path in ADMIN_PATHS or pinned:
        return Level.ADMIN
    return Level.CLIENT


def _bearer(header: str | None, key: str) -> bool:
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


def is_loopback(host: str | None) -> bool:
    """Whether a peer address is this machine (127.0.0.0/8, ::1, or a Unix socket: no address)."""
    if not host:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def decide(
    level: Level, authorization: str | None, peer: str | None, api_key: str | None, admin_api_key: str | None
) -> APIError | None:
    """None when the request may go on, else the error to answer (401 or 403)."""
    if level is Level.OPEN:
        return None
    if level is Level.ADMIN:
        if admin_api_key:
            if _bearer(authorization, admin_api_key):
                return None
            return APIError(401, "this action needs the router's admin API key (Authorization: Bearer ...)")
        if not is_loopback(peer):
            return APIError(403, "this action is open to loopback clients only; start the router with --admin-api-key")
    # A client request (or an admin action the admin key does not guard): the client key, when there is one.
    if (
        api_key
        and not _bearer(authorization, api_key)
        and not (admin_api_key and _bearer(authorization, admin_api_key))
    ):
        return APIError(401, "missing or invalid API key (Authorization: Bearer ...)")
    return None
