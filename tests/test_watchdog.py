"""No orphans: the watchdog kills a dead driver's Ray processes, and only Ray's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fedopt.watchdog import is_ray_process, watch

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import subprocess, sys, time
ray = subprocess.Popen([sys.executable, sys.argv[1]])       # a path under .../ray/...
other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(ray.pid, other.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize(
    ("name", "cmdline", "expected"),
    [
        ("raylet", ["/x/raylet"], True),
        ("gcs_server", ["/x/gcs_server"], True),
        ("ray::DashboardAgent", ["ray::DashboardAgent"], True),
        ("python", ["/v/bin/python", "-u", "/v/site-packages/ray/_private/log_monitor.py"], True),
        ("python", ["/v/bin/python", "/v/site-packages/ray/dashboard/agent.py"], True),
        ("python", ["/v/bin/python", "-m", "fedopt.watchdog", "12"], False),
        ("bash", ["bash", "-c", "sleep 1"], False),
    ],
)
def test_only_rays_processes_count(name, cmdline, expected):
    assert is_ray_process(name, cmdline) is expected


def test_a_killed_drivers_ray_descendants_are_killed_and_others_left(tmp_path):
    fake = tmp_path / "ray" / "worker.py"
    fake.parent.mkdir()
    fake.write_text("import time\ntime.sleep(60)\n")
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(fake)], stdout=subprocess.PIPE, text=True
    )
    ray_pid, other_pid = map(int, driver.stdout.readline().split())
    got: list[int] = []
    thread = threading.Thread(target=lambda: got.append(watch(driver.pid, interval=0.05)))
    thread.start()
    time.sleep(0.5)  # the watchdog records the descendants
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    thread.join(timeout=10)
    assert got == [1]
    psutil.Process(ray_pid).wait(timeout=5)  # killed
    other = psutil.Process(other_pid)
    assert other.is_running()  # not Ray's: left alone
    other.kill()
