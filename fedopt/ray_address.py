"""A Ray cluster address checked before the engine starts: unreachable is one line, in seconds.

``ray.init(address=...)`` retries an address that does not answer for minutes
(and ignores SIGTERM while it does). A plain TCP connection to the address's
port, with a bounded timeout (``run.connect_timeout``), tells a wrong or
dead address from a live one before any engine starts. ``auto`` (the cluster
this machine started) and ``local`` are left to Ray.
"""

from __future__ import annotations

import socket

from fedopt.errors import ConfigError

__all__ = ["RAY_GCS_PORT", "RAY_CLIENT_PORT", "check_reachable", "host_port"]

#: Ray's default ports: the GCS of ``ray start --head`` and the Ray Client server.
RAY_GCS_PORT = 6379
RAY_CLIENT_PORT = 10001


def host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a Ray address, None for ``auto`` and ``local``.

    ``ray://host[:port]`` defaults to the Ray Client port, ``host[:port]`` to
    the GCS port; an IPv6 host is written in brackets (``[::1]:6379``).

    Raises
    ------
    ConfigError
        The port is not an integer in 1..65535, or the host is empty.
    """
    text = address.strip()
    if text in ("auto", "local"):
        return None
    default = RAY_GCS_PORT
    if text.startswith("ray://"):
        text, default = text[len("ray://") :], RAY_CLIENT_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    allowed = "auto, local, host:port or ray://host:port (port 1..65535)"
    if not host or (port_text and not (port_text.isdigit() and 1 <= int(port_text) <= 65535)):
        raise ConfigError("run.ray_address", address, allowed)
    return host, int(port_text) if port_text else default


def check_reachable(address: str | None, *, timeout: float) -> None:
    """Raise unless ``address`` accepts a TCP connection within ``timeout`` seconds.

    Raises
    ------
    ConfigError
        Naming the address, the port tried and why the connection failed.
    """
    if not address:
        return
    target = host_port(address)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ConfigError(
            "run.ray_address",
            address,
            f"a Ray cluster answering within run.connect_timeout = {timeout:g} s "
            f"({host}:{port}: {why})",
        ) from None
