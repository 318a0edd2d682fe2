"""Where DP randomness comes from: a secret per-run key, or the scenario's seed (replayable).

A DP guarantee holds against a party that cannot predict the noise. When every
random draw is seeded from ``run.seed`` (written into ``scenario.toml``), anyone
holding the scenario can regenerate the noise and subtract it: the ε then holds
only against a party without the seed. With ``noise = "secret"`` a run draws a
256-bit :class:`NoiseKey` from OS entropy when it starts, and every DP draw
(Poisson masks, DP-SGD noise, user-level noise) is seeded from
HMAC-SHA256(key, purpose, round, client). The key travels to the clients inside
the ClientApp object Ray ships to its workers (never in a message), is saved in
the run's checkpoints (so ``fedopt resume`` stays bitwise exact) and is written
nowhere else: not in scenario.toml, metrics, summary.json or the logs.

The secrecy is computational: each generator is a torch/NumPy generator
seeded with 63 bits of the HMAC, so the noise is unpredictable to a party
without the key, but it is not Opacus's ``secure_mode`` (a CSPRNG resistant to
floating-point attacks), whose torchcsprng dependency is no longer maintained.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Mapping
from typing import Any, Literal

from fedopt.params import check

__all__ = [
    "NOISE_MODES",
    "NoiseKey",
    "NoiseMode",
    "check_noise_mode",
    "noise_statement",
    "wants_secret",
]

NoiseMode = Literal["secret", "replayable"]

#: What each ``noise`` setting means, as stated in summary.json.
NOISE_MODES: Mapping[str, str] = {
    "secret": (
        "every DP random draw comes from a 256-bit per-run key drawn from OS entropy; the key "
        "is kept only in the run's checkpoints (delete checkpoints/ before sharing a run "
        "directory), so the guarantee holds against anyone who reads the rest of the run "
        "directory, the scenario and its seed included"
    ),
    "replayable": (
        "every DP random draw is seeded from run.seed, which scenario.toml records: the run "
        "replays bitwise, and the guarantee holds only against a party that does not know "
        "the seed (anyone holding scenario.toml can regenerate and subtract the noise)"
    ),
}


def check_noise_mode(value: str, key: str = "noise") -> None:
    """Refuse a ``noise`` setting other than ``secret`` / ``replayable``."""
    check(value in NOISE_MODES, key, value, " or ".join(f'"{m}"' for m in NOISE_MODES))


def noise_statement(mode: str) -> dict[str, str]:
    """The summary.json entry for a noise mode: the mode and what it guarantees."""
    return {"noise": mode, "noise_secrecy": NOISE_MODES[mode]}


def wants_secret(scenario: Any) -> bool:
    """Whether a DP part of the scenario (client or ``[user_dp]``) asks for ``noise = "secret"``.

    A ``non_private`` DP-SGD client adds no noise, so it has nothing to keep
    secret and stays seeded from ``run.seed``.
    """
    parts = [scenario.client.params, scenario.extras.get("user_dp")]
    return any(
        getattr(p, "noise", None) == "secret" and not getattr(p, "non_private", False)
        for p in parts
        if p is not None
    )


class NoiseKey:
    """A secret 256-bit key and the seeds derived from it (HMAC-SHA256).

    Parameters
    ----------
    key : bytes
        32 bytes; :meth:`new` draws them from OS entropy.

    The key never appears in ``repr`` or ``str``; :meth:`to_bytes` exists for
    the checkpoint only.
    """

    __slots__ = ("_key",)
    SIZE = 32

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != self.SIZE:
            raise ValueError(f"a noise key is {self.SIZE} bytes")
        self._key = bytes(key)

    @classmethod
    def new(cls) -> NoiseKey:
        """A fresh key from the operating system's entropy source."""
        return cls(secrets.token_bytes(cls.SIZE))

    def seed(self, *parts: int) -> int:
        """A 63-bit seed for ``parts`` (purpose, round, client, ...): HMAC-SHA256, truncated."""
        msg = b"".join(struct.pack(">q", int(p)) for p in parts)
        digest = hmac.new(self._key, b"fedopt-noise\x00" + msg, hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def to_bytes(self) -> bytes:
        """The raw key (for the checkpoint, which is as private as the data)."""
        return self._key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseKey) and hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self.seed(0))

    def __repr__(self) -> str:
        return "NoiseKey(<secret>)"

    def __reduce__(self) -> tuple[Any, ...]:
        return (NoiseKey, (self._key,))
