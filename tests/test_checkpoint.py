"""Checkpoint files (format, atomic writes, torn files, pruning) and the stop-signal handling."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedopt.checkpoint import (
    CHECKPOINT_DIR,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    StopRequest,
    latest_checkpoint,
    read_checkpoint,
    save_checkpoint,
    stop_on_signals,
)
from fedopt.errors import ConfigError, RunError, RunInterrupted

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Momentum:
    """A stand-in for a strategy's own state object."""

    beta: float
    buffers: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


def payload(round_: int = 3) -> dict:
    torch.manual_seed(round_)
    model = torch.nn.Linear(4, 3)
    return {
        "format": 1,
        "round": round_,
        "global": ArrayRecord(model.state_dict()),
        "config": ConfigRecord({"lr": 0.1, "name": "fedavg"}),
        "metrics": MetricRecord({"loss": 0.25}),
        "clients": {7: RecordDict({"opt": ArrayRecord([np.arange(5.0)])})},
        "numpy": np.linspace(0.0, 1.0, 11, dtype=np.float32),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.default_rng(round_).bit_generator.state,
        "strategy": Momentum(0.9, {"w": torch.ones(2, 2) * round_}, [1, 2.5, None]),
        "rows": [{"round": r, "loss": 1.0 / (r + 1)} for r in range(round_ + 1)],
    }


def ckpt_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / CHECKPOINT_DIR).iterdir())


def test_payload_round_trip_keeps_every_kind_of_value(tmp_path):
    original = payload(3)
    path = save_checkpoint(tmp_path, original, round_=3)
    assert path == tmp_path / "checkpoints" / "round-000003.ckpt"
    ck = read_checkpoint(path)
    got = ck.payload
    assert ck.round == 3 and ck.path == path
    want_sd = original["global"].to_torch_state_dict()
    got_sd = got["global"].to_torch_state_dict()
    assert all(torch.equal(want_sd[k], got_sd[k]) for k in want_sd) and list(got_sd) == list(
        want_sd
    )
    assert dict(got["config"]) == {"lr": 0.1, "name": "fedavg"}
    assert dict(got["metrics"]) == {"loss": 0.25}
    arr = got["clients"][7].array_records["opt"]
    np.testing.assert_array_equal(next(iter(arr.values())).numpy(), np.arange(5.0))
    assert got["numpy"].dtype == np.float32
    np.testing.assert_array_equal(got["numpy"], original["numpy"])
    assert torch.equal(got["torch_rng"], original["torch_rng"])
    assert got["numpy_rng"] == original["numpy_rng"]
    assert got["strategy"].beta == 0.9 and got["strategy"].history == [1, 2.5, None]
    assert torch.equal(got["strategy"].buffers["w"], torch.full((2, 2), 3.0))
    assert got["rows"] == original["rows"]
    # the restored RNG state continues the same stream
    torch.set_rng_state(got["torch_rng"])
    a = torch.rand(3)
    torch.set_rng_state(original["torch_rng"])
    assert torch.equal(a, torch.rand(3))


def test_header_holds_magic_version_round_length_and_digest(tmp_path):
    path = save_checkpoint(tmp_path, {"round": 12, "x": list(range(100))}, round_=12)
    data = path.read_bytes()
    magic, version, round_, length, digest = HEADER.unpack(data[: HEADER.size])
    assert HEADER.size == 60
    assert (magic, version, round_) == (MAGIC, FORMAT_VERSION, 12) == (b"FEDOPTCK", 1, 12)
    body = data[HEADER.size :]
    assert length == len(body) and digest == hashlib.sha256(body).digest()
    assert pickle.loads(body) == {"round": 12, "x": list(range(100))}
    assert path.name == "round-000012.ckpt"


@pytest.mark.parametrize("cut", [0, 7, HEADER.size - 1, HEADER.size, HEADER.size + 9, -1])
def test_torn_file_is_skipped_and_the_older_one_returned(tmp_path, caplog, cut):
    save_checkpoint(tmp_path, payload(1), round_=1)
    newest = save_checkpoint(tmp_path, payload(2), round_=2)
    data = newest.read_bytes()
    newest.write_bytes(data[: cut if cut >= 0 else len(data) + cut])
    with caplog.at_level(logging.WARNING, logger="fedopt"):
        ck = latest_checkpoint(tmp_path)
    assert ck is not None and ck.round == 1 and ck.payload["rows"] == payload(1)["rows"]
    assert "round-000002.ckpt" in caplog.text and "torn" in caplog.text
    with pytest.raises(RunError, match="round-000002.ckpt"):
        read_checkpoint(newest)


@pytest.mark.parametrize(
    ("where", "why"),
    [
        (0, "bad magic"),
        (9, "format version"),
        (13, "file name round"),
        (25, "torn"),
        (-5, "sha256"),
    ],
)
def test_flipped_byte_is_detected(tmp_path, caplog, where, why):
    save_checkpoint(tmp_path, payload(1), round_=1)
    newest = save_checkpoint(tmp_path, payload(2), round_=2)
    data = bytearray(newest.read_bytes())
    data[where] ^= 0x01
    newest.write_bytes(bytes(data))
    with pytest.raises(RunError, match=f"round-000002.ckpt.*{why}"):
        read_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="fedopt"):
        assert latest_checkpoint(tmp_path).round == 1
    assert "round-000002.ckpt" in caplog.text and why in caplog.text


def test_trailing_garbage_and_unreadable_body(tmp_path):
    path = save_checkpoint(tmp_path, {"a": 1}, round_=4)
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(RunError, match="torn: the body has"):
        read_checkpoint(path)
    body = b"not a pickle"
    path.write_bytes(
        HEADER.pack(MAGIC, FORMAT_VERSION, 4, len(body), hashlib.sha256(body).digest()) + body
    )
    with pytest.raises(RunError, match=r"round-000004.ckpt cannot be loaded: UnpicklingError"):
        read_checkpoint(path)
    body = pickle.dumps([1, 2])
    path.write_bytes(
        HEADER.pack(MAGIC, FORMAT_VERSION, 4, len(body), hashlib.sha256(body).digest()) + body
    )
    with pytest.raises(RunError, match="holds a list, not a dict"):
        read_checkpoint(path)
    with pytest.raises(RunError, match=r"round-000009.ckpt cannot be read"):
        read_checkpoint(tmp_path / "round-000009.ckpt")
    assert latest_checkpoint(tmp_path) is None


def test_crash_during_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    first = save_checkpoint(tmp_path, payload(1), round_=1)
    before = first.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, payload(2), round_=2)
    monkeypatch.undo()
    with pytest.raises(TypeError):  # an unpicklable object half-way through the body
        save_checkpoint(tmp_path, {"ok": np.zeros(1000), "bad": threading.Lock()}, round_=3)
    assert ckpt_files(tmp_path) == ["round-000001.ckpt"]  # no partial file, no temp file
    assert first.read_bytes() == before
    assert latest_checkpoint(tmp_path).round == 1


def test_keep_prunes_by_round_number_not_mtime(tmp_path):
    for r in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, {"round": r}, round_=r, keep=2)
    assert ckpt_files(tmp_path) == ["round-000004.ckpt", "round-000005.ckpt"]
    save_checkpoint(tmp_path, {"round": 6}, round_=6, keep=1)
    assert ckpt_files(tmp_path) == ["round-000006.ckpt"]
    # seven digits sort after six by number; a newer mtime does not make 999999 newest
    save_checkpoint(tmp_path, {"round": 1_000_000}, round_=1_000_000, keep=3)
    old = save_checkpoint(tmp_path, {"round": 999_999}, round_=999_999, keep=3)
    assert ckpt_files(tmp_path) == ["round-000006.ckpt", "round-999999.ckpt"]  # later one dropped
    big = save_checkpoint(tmp_path, {"round": 1_000_000}, round_=1_000_000, keep=3)
    os.utime(old, (2e9, 2e9))
    os.utime(big, (1e9, 1e9))
    assert latest_checkpoint(tmp_path).payload == {"round": 1_000_000}


def test_saving_an_earlier_round_drops_later_ones_and_stray_temp_files(tmp_path):
    for r in (2, 4, 6):
        save_checkpoint(tmp_path, {"round": r}, round_=r, keep=5)
    stray = tmp_path / CHECKPOINT_DIR / ".round-000008.ckpt.abc123.tmp"
    stray.write_bytes(b"half a checkpoint")
    assert latest_checkpoint(tmp_path).round == 6  # temp files are never read
    save_checkpoint(tmp_path, {"round": 5}, round_=5, keep=5)  # a resume from round 4
    assert ckpt_files(tmp_path) == ["round-000002.ckpt", "round-000004.ckpt", "round-000005.ckpt"]


def test_bad_arguments_and_empty_directories(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(ConfigError, match="keep = 0"):
        save_checkpoint(tmp_path, {}, round_=1, keep=0)
    with pytest.raises(ConfigError, match="round_ = -1"):
        save_checkpoint(tmp_path, {}, round_=-1)


def test_stop_request_and_run_interrupted_message():
    stop = StopRequest()
    assert not stop.is_set() and stop.signal_name is None
    stop.set("SIGTERM")
    stop.set("SIGINT")
    assert stop.is_set() and stop.signal_name == "SIGTERM" and not stop.is_hard()
    stop.set("SIGINT", at_once=True)
    assert stop.is_hard() and stop.signal_name == "SIGTERM"
    err = RunInterrupted(7, "runs/q/1", "SIGTERM")
    assert isinstance(err, RunError)
    assert str(err) == "stopped by SIGTERM after round 7; continue with: fedopt resume runs/q/1"
    assert str(pickle.loads(pickle.dumps(err))) == str(err)
    assert str(RunInterrupted(0, "d")) == "stopped after round 0; continue with: fedopt resume d"


def test_stop_on_signals_restores_handlers_and_is_inert_off_the_main_thread():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals(StopRequest()) as stop:
        assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        assert not stop.is_set()
    assert {s: signal.getsignal(s) for s in before} == before
    seen = []

    def other_thread():
        with stop_on_signals(StopRequest()) as inner:
            seen.append((inner.is_set(), signal.getsignal(signal.SIGTERM)))

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert seen == [(False, before[signal.SIGTERM])]


def run_python(code: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_first_signal_sets_the_flag_and_second_stops_at_once():
    out = run_python(
        """
        import os, signal, time
        from fedopt.checkpoint import StopRequest, stop_on_signals

        stop = StopRequest()
        before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in a background job
        with stop_on_signals(stop):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            print("alive", stop.is_set(), stop.signal_name, stop.is_hard(), flush=True)
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
                print("second signal ignored")
            except KeyboardInterrupt as err:
                print("hard stop:", err, stop.is_hard())
                print("restored", signal.getsignal(signal.SIGINT) is before)
        print("after", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
        """,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "alive True SIGTERM False",
        "hard stop: SIGTERM, then SIGINT: stopping at once True",
        "restored True",
        "after True",
    ]
    assert "SIGTERM: stopping after the current round; a checkpoint will be written" in out.stderr


@pytest.mark.slow
def test_ray_init_does_not_take_sigterm_over():
    """ray.init replaces SIGTERM in Python and in C++ (abort 3 s later); neither may win."""
    out = run_python(
        """
        import os, signal, time
        from fedopt.checkpoint import StopRequest, stop_on_signals

        stop = StopRequest()
        with stop_on_signals(stop):
            ours = signal.getsignal(signal.SIGTERM)
            import ray
            ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")

            @ray.remote
            def work():
                time.sleep(2)
                return 42

            ref = work.remote()
            print("kept", signal.getsignal(signal.SIGTERM) is ours, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(4)  # past the 3 s abort alarm of Ray's C++ handler
            print("alive", stop.signal_name, ray.get(ref), flush=True)
            ray.shutdown()
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except KeyboardInterrupt:
                print("hard stop after shutdown", flush=True)
        print("ray's handler restored", signal.getsignal(signal.SIGTERM).__module__[:4])
        """,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [
        "kept True",
        "alive SIGTERM 42",
        "hard stop after shutdown",
        "ray's handler restored ray.",
    ]
