"""Fast reachability checks for the services a study talks to (Ray, an MLflow server).

Ray's ``ray.init(address=...)`` waits for minutes on an address where nothing listens, and
MLflow's HTTP client retries with back-off; a TCP connection attempt answers in seconds, so the
study checks first and says what to fix.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

TIMEOUT_S = 5.0


def host_port(address: str, default_port: int) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port``, ``scheme://host[:port]/...``; None for ``auto``/local."""
    if address in ("", "auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"//{address}")
    if not parts.hostname:
        return None
    port = parts.port or (443 if parts.scheme == "https" else default_port)
    return parts.hostname, port


def unreachable(host: str, port: int, timeout: float = TIMEOUT_S) -> str | None:
    """Why a TCP connection to ``host:port`` fails within ``timeout`` s, or None if it opens."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return str(err) or type(err).__name__


def check_ray_address(address: str) -> None:
    """Raise ConnectionError, naming the address and the fix, when nothing listens there."""
    target = host_port(address, default_port=6379)
    if target is None:
        return
    why = unreachable(*target)
    if why is not None:
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address!r} ({why}). Start it with "
            "`ray start --head` on that machine, check --address / RAY_ADDRESS, or drop "
            "--address to run on a local Ray"
        )


def check_tracking_uri(uri: str) -> str | None:
    """Why an ``http(s)://`` MLflow tracking server cannot be reached, or None (other stores,
    e.g. ``sqlite:///`` files, are checked by MLflow itself)."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return None
    target = host_port(uri, default_port=80)
    return None if target is None else unreachable(*target)
