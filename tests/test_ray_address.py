"""A Ray address is checked before the engine starts: unreachable is one line within the timeout."""

from __future__ import annotations

import socket

import pytest

from fedopt.errors import ConfigError
from fedopt.ray_address import RAY_CLIENT_PORT, RAY_GCS_PORT, check_reachable, host_port


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("auto", None),
        ("local", None),
        ("10.0.0.5:6380", ("10.0.0.5", 6380)),
        ("head-node", ("head-node", RAY_GCS_PORT)),
        ("ray://head:10002", ("head", 10002)),
        ("ray://head", ("head", RAY_CLIENT_PORT)),
        ("[::1]:7000", ("::1", 7000)),
        ("[::1]", ("::1", RAY_GCS_PORT)),
    ],
)
def test_addresses_resolve_to_the_port_ray_would_use(address, expected):
    assert host_port(address) == expected


@pytest.mark.parametrize("address", ["host:0", "host:65536", "host:http", ":6379", "ray://"])
def test_a_malformed_address_is_named(address):
    with pytest.raises(ConfigError) as info:
        host_port(address)
    assert info.value.key == "run.ray_address" and "host:port" in str(info.value)


def test_a_listening_port_passes_and_a_closed_one_is_one_line():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}", timeout=2.0)
    with pytest.raises(ConfigError) as info:  # the same port, now closed
        check_reachable(f"127.0.0.1:{port}", timeout=2.0)
    message = str(info.value)
    assert message == (
        f"run.ray_address = '127.0.0.1:{port}' is not allowed: a Ray cluster answering within "
        f"run.connect_timeout = 2 s (127.0.0.1:{port}: Connection refused)"
    )
    check_reachable(None, timeout=1.0)
    check_reachable("auto", timeout=1.0)


def test_an_address_that_does_not_answer_times_out_in_one_line(monkeypatch):
    seen = {}

    def silent(address, timeout):
        seen.update(address=address, timeout=timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    with pytest.raises(ConfigError, match=r"within run.connect_timeout = 0.5 s \(h:1: timed out\)"):
        check_reachable("h:1", timeout=0.5)
    assert seen == {"address": ("h", 1), "timeout": 0.5}
