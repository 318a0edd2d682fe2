"""Zeroth-order math shared by both halves of FedKSeed: seeds to perturbations, steps, replay.

Everything that the server and every client must compute identically lives
here, so that a model rebuilt from (seed, scalar) pairs is the model the
clients trained:

- the seed pool (:func:`pool_seeds`) and the perturbation z_s of a seed: one
  Gaussian tensor per trainable parameter, in ``named_parameters`` order, each
  drawn in float32 on a declared generator device (the CPU by default, since
  CPU and CUDA generators give different numbers) from its own sub-seed
  (:func:`sub_seed`), then cast to the parameter's device and dtype;
- the two-point estimate ĝ = (L(w + εz) − L(w − εz)) / (2ε) with in-place
  perturbations that leave the weights bit for bit as they were
  (:class:`Perturbation`);
- the update w ← w − η ĝ z and its replay from (seed, scalar) lists
  (:meth:`Noise.replay_`, :func:`replay_delta_`);
- FedKSeed-Pro's seed probabilities (:func:`pro_scores`, :func:`pro_probabilities`);
- "Just One Byte" scalars: sign + log-magnitude in an int8 (:func:`to_bytes`,
  :func:`from_bytes`);
- the wire format of both halves (:class:`Wire`, :func:`encode_reply`,
  :func:`decode_reply`, :func:`pack_indices`, :func:`wire_array`);
- the peak tensor memory of a step (:class:`PeakMemory`), which clients report
  and ``bench/zo_memory.py`` compares.

Every scaled addition is done as a multiplication followed by an addition, two
correctly rounded element-wise operations, so the result does not depend on how
a kernel vectorises or splits the work between threads: the server and a
client with another thread count get the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from flwr.app import Array
from torch import nn

__all__ = [
    "LEVELS_PER_E",
    "Noise",
    "PeakMemory",
    "Perturbation",
    "Wire",
    "byte_offset",
    "decode_reply",
    "encode_reply",
    "from_bytes",
    "index_dtype",
    "pack_indices",
    "pool_base_seed",
    "pool_seeds",
    "pro_probabilities",
    "pro_scores",
    "probabilities_from_scores",
    "projected_gradient",
    "replay_delta_",
    "scores_from_byte",
    "scores_to_byte",
    "sub_seed",
    "to_bytes",
    "unpack_indices",
    "wire_array",
    "wire_values",
]

_MASK64 = (1 << 64) - 1
#: Resolution of the one-byte scalars: code steps per factor e of magnitude (Just One Byte).
LEVELS_PER_E = 16
#: Largest FedKSeed seed (``np.random.randint(1, 1e11, K)`` in the released code).
_SEED_HIGH = 10**11


# -- seeds ----------------------------------------------------------------------------------
def pool_base_seed(run_seed: int) -> int:
    """The seed from which a run's K candidate seeds are drawn (fixed by the run's seed)."""
    state = np.random.SeedSequence([int(run_seed), 0x5EED_F00D]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def pool_seeds(base_seed: int, k: int) -> np.ndarray:
    """The K candidate seeds (int64 in [1, 1e11)) drawn from ``base_seed``; same everywhere."""
    if k < 1:
        raise ValueError(f"the seed pool needs k >= 1 seeds, got {k}")
    return np.random.default_rng(int(base_seed)).integers(1, _SEED_HIGH, size=k, dtype=np.int64)


def sub_seed(seed: int, index: int) -> int:
    """The generator seed of parameter ``index`` under ``seed`` (63 bits).

    The (index + 1)-th output of SplitMix64 started at ``seed``, shifted right by one.
    """
    x = (int(seed) + (int(index) + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def index_dtype(k: int) -> np.dtype:
    """The smallest unsigned integer type that holds seed indices 0..k-1."""
    return np.dtype(np.uint16) if k <= 1 << 16 else np.dtype(np.uint32)


def pack_indices(idx: np.ndarray, k: int) -> np.ndarray:
    """Increasing seed indices as gaps (the first index, then differences) for the wire.

    One byte each when every gap is below 256 (τ = 200 seeds out of K = 4096 are
    about 20 apart), else :func:`index_dtype` of ``k``.
    """
    gaps = np.diff(np.asarray(idx, dtype=np.int64), prepend=0)
    if len(gaps) and (gaps.min() < 0 or (len(gaps) > 1 and gaps[1:].min() < 1)):
        raise ValueError("seed indices must be strictly increasing")
    small = len(gaps) == 0 or gaps.max() < 256
    return gaps.astype(np.uint8 if small else index_dtype(k))


def unpack_indices(gaps: np.ndarray) -> np.ndarray:
    """The seed indices :func:`pack_indices` packed (int64)."""
    return np.cumsum(np.asarray(gaps, dtype=np.int64))


# -- perturbations and updates ------------------------------------------------------------
class Noise:
    """The perturbations z_s of one model's trainable parameters.

    Parameters
    ----------
    model : torch.nn.Module
        Its parameters with ``requires_grad`` (``named_parameters`` order, tied
        parameters once) are the coordinates that seeds perturb and updates move.
    device : str
        Where the Gaussian numbers are drawn (``"cpu"`` or ``"cuda"``). Every party
        must use the same one.
    """

    def __init__(self, model: nn.Module, *, device: str = "cpu") -> None:
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)

    def z(self, seed: int, index: int) -> torch.Tensor:
        """z_s of parameter ``index``: float32 normals on the generator device, then cast."""
        p = self.params[index][1]
        self.generator.manual_seed(sub_seed(seed, index))
        z = torch.randn(p.shape, generator=self.generator, dtype=torch.float32, device=self.device)
        return z.to(device=p.device, dtype=p.dtype)

    def _axpy_(self, p: torch.Tensor, seed: int, index: int, scale: float) -> None:
        z = self.z(seed, index)
        z.mul_(scale)
        p.add_(z)

    @torch.no_grad()
    def add_(self, seed: int, scale: float) -> None:
        """Move every trainable parameter by scale·z_s in place (the whole model at once)."""
        for i, (_, p) in enumerate(self.params):
            self._axpy_(p, seed, i, scale)

    @torch.no_grad()
    def step_(self, seed: int, g: float, *, lr: float, weight_decay: float = 0.0) -> None:
        """Apply one ZO update w ← w − lr·(g·z_s + weight_decay·w); decay skips 1-d parameters.

        Weight decay is not part of what the server replays, so any value above
        zero makes a client's local model differ from the replayed one.
        """
        for i, (_, p) in enumerate(self.params):
            if weight_decay and p.ndim >= 2:
                p.mul_(1.0 - lr * weight_decay)
            self._axpy_(p, seed, i, -lr * g)

    @torch.no_grad()
    def replay_(self, seeds: Sequence[int], scalars: Sequence[float], *, lr: float) -> None:
        """Apply w ← w − lr·c·z_s for every (s, c) pair, in the given order."""
        pairs = [(int(s), float(c)) for s, c in zip(seeds, scalars, strict=True) if c != 0.0]
        for i, (_, p) in enumerate(self.params):
            for s, c in pairs:  # per element the same sequence as seed by seed: same bits
                self._axpy_(p, s, i, -lr * c)


def replay_delta_(
    noise: Noise, seeds: np.ndarray, new: np.ndarray, old: np.ndarray, *, lr: float
) -> int:
    """Move a model synced at accumulators ``old`` to ``new``; returns the seeds replayed.

    The per-seed change D = new − old is taken in float32 and replayed in
    ascending seed index, so the server (old = the previous round's
    accumulators) and a client that synced last round compute the same bits.
    """
    delta = np.asarray(new, dtype=np.float32) - np.asarray(old, dtype=np.float32)
    idx = np.flatnonzero(delta)
    noise.replay_(seeds[idx].tolist(), delta[idx].tolist(), lr=lr)
    return len(idx)


class Perturbation:
    """In-place ±εz perturbations of a model for the two forward passes of a ZO step.

    While a loss is computed through :meth:`loss`, every module moves its own
    trainable parameters by ``scale·z_s`` in place just before it runs and
    copies them back right after (forward pre/post hooks), so the forward pass
    sees w + scale·z and only one module's parameters are ever held twice,
    never the whole model. This is MeZO's +εz, −2εz, +εz sequence done module
    by module with exact restores: adding and then subtracting εz in floating
    point leaves about half of the weights an ulp away from where they were,
    and that drift would go into the model without ever being sent.

    A parameter that its owner module does not use in its own forward (read by
    a parent module directly) would be seen unperturbed; :meth:`covers` checks
    a model for that once.
    """

    def __init__(self, model: nn.Module, noise: Noise) -> None:
        self.model = model
        self.noise = noise
        index = {id(p): i for i, (_, p) in enumerate(noise.params)}
        self.owners: list[tuple[nn.Module, list[tuple[int, torch.Tensor]]]] = []
        for module in model.modules():
            own = [
                (index[id(p)], p)
                for p in module._parameters.values()
                if p is not None and id(p) in index
            ]
            if own:
                self.owners.append((module, own))
        self.seed: int | None = None
        self.scale = 0.0
        self._saved: dict[int, torch.Tensor] = {}
        self._depth: dict[int, int] = {}
        self.touched: set[int] = set()

    def _pre(self, own: list[tuple[int, torch.Tensor]]) -> Callable[..., None]:
        def hook(module: nn.Module, args: object) -> None:
            if self.seed is None:
                return
            with torch.no_grad():
                for i, p in own:
                    depth = self._depth.get(i, 0)
                    if depth == 0:
                        self._saved[i] = p.detach().clone()
                        self.noise._axpy_(p.detach(), self.seed, i, self.scale)
                        self.touched.add(i)
                    self._depth[i] = depth + 1

        return hook

    def _post(self, own: list[tuple[int, torch.Tensor]]) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            with torch.no_grad():
                for i, p in own:
                    depth = self._depth.get(i, 0) - 1
                    if depth > 0:
                        self._depth[i] = depth
                        continue
                    self._depth.pop(i, None)
                    saved = self._saved.pop(i, None)
                    if saved is not None:
                        p.detach().copy_(saved)

        return hook

    def _restore_all(self) -> None:
        with torch.no_grad():
            for _, own in self.owners:
                for i, p in own:
                    saved = self._saved.pop(i, None)
                    if saved is not None:
                        p.detach().copy_(saved)
        self._depth.clear()

    @contextmanager
    def hooked(self) -> Iterator[Perturbation]:
        """Install the hooks for a block of ZO steps; they are removed (weights restored) after."""
        handles = []
        try:
            for module, own in self.owners:
                handles.append(module.register_forward_pre_hook(self._pre(own)))
                handles.append(module.register_forward_hook(self._post(own), always_call=True))
            yield self
        finally:
            for h in handles:
                h.remove()
            self.seed = None
            self._restore_all()

    def loss(self, fn: Callable[[], torch.Tensor], *, seed: int, scale: float) -> float:
        """``fn()`` (a scalar loss) computed at w + scale·z_s, inside :meth:`hooked`."""
        self.seed, self.scale = int(seed), float(scale)
        try:
            with torch.no_grad():
                return float(fn())
        finally:
            self.seed = None
            self._restore_all()

    def two_point(
        self, fn: Callable[[], torch.Tensor], *, seed: int, eps: float
    ) -> tuple[float, float]:
        """(L(w + εz_s), L(w − εz_s)) for one seed, the weights unchanged afterwards."""
        return self.loss(fn, seed=seed, scale=eps), self.loss(fn, seed=seed, scale=-eps)

    def covers(self, fn: Callable[[], torch.Tensor], *, seed: int, eps: float) -> bool:
        """Whether the hooked loss equals the loss with every parameter perturbed at once.

        A one-off check (it holds one extra copy of the trainable parameters):
        false means some parameter is read outside the forward of a module that holds it.
        """
        with self.hooked():
            hooked = self.loss(fn, seed=seed, scale=eps)
        saved = [p.detach().clone() for _, p in self.noise.params]
        try:
            self.noise.add_(seed, eps)
            with torch.no_grad():
                whole = float(fn())
        finally:
            with torch.no_grad():
                for (_, p), s in zip(self.noise.params, saved, strict=True):
                    p.copy_(s)
        return math.isclose(hooked, whole, rel_tol=1e-6, abs_tol=1e-9)


class PeakMemory:
    """Peak tensor memory of a block of work: what it is given to track plus all it allocates.

    A thin use of PyTorch's ``MemTracker`` (CPU and CUDA alike): tensors are
    counted by storage as operators create and free them, so the peak is exact
    for everything that goes through the dispatcher. Call :meth:`forward_starts`
    before each forward pass inside the block (the tracker also attributes
    memory to modules and otherwise refuses a module that runs twice).
    ``peak_bytes`` stays None where the tracker is unavailable.

    Parameters
    ----------
    *tracked : nn.Module, torch.optim.Optimizer or torch.Tensor
        What existed before the block and counts (the model: its parameters).
    """

    def __init__(self, *tracked: object) -> None:
        self.tracked = tracked
        self.peak_bytes: int | None = None
        self.by_kind: dict[str, int] = {}
        self._tracker: object | None = None

    def __enter__(self) -> PeakMemory:
        try:
            from torch.distributed._tools.mem_tracker import MemTracker
        except ImportError:  # a torch build without it: no measurement
            return self
        tracker = MemTracker()
        tracker.track_external(*self.tracked)
        tracker.__enter__()
        self._tracker = tracker
        return self

    def __exit__(self, *exc: object) -> None:
        tracker, self._tracker = self._tracker, None
        if tracker is None:
            return
        tracker.__exit__(*exc)  # type: ignore[attr-defined]
        for per_device in tracker.get_tracker_snapshot("peak").values():  # type: ignore[attr-defined]
            for kind, value in per_device.items():
                name = str(getattr(kind, "value", kind))
                self.by_kind[name] = self.by_kind.get(name, 0) + int(value)
        self.peak_bytes = self.by_kind.get("Total")

    def forward_starts(self) -> None:
        """Tell the tracker a forward pass begins (it resets its per-module statistics)."""
        if self._tracker is not None:
            self._tracker.reset_mod_stats()  # type: ignore[attr-defined]


def projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    """The two-point estimate ĝ = (L⁺ − L⁻) / (2ε) of the directional derivative along z."""
    return (loss_plus - loss_minus) / (2.0 * eps)


# -- FedKSeed-Pro -------------------------------------------------------------------------
def pro_scores(
    abs_sum: np.ndarray, count: np.ndarray, *, clip: float = 1000.0, initial: float = 0.0
) -> np.ndarray:
    """ψ̃: each seed's mean |clip(ĝ)| over its history, min-max normalised to [0, 1].

    The history of seed s is ``[initial]`` followed by every ĝ recorded for it;
    ``abs_sum`` holds the sums of |clip(ĝ, −clip, clip)| and ``count`` their
    number (the released code's ``calculate_probabilities``).
    """
    start = min(abs(initial), clip)
    psi = (start + np.asarray(abs_sum, dtype=np.float64)) / (np.asarray(count) + 1.0)
    return (psi - psi.min()) / (psi.max() - psi.min() + 1e-10)


def probabilities_from_scores(scores: np.ndarray) -> np.ndarray:
    """Probabilities softmax(ψ̃), renormalised (max/min ratio at most e)."""
    e = np.exp(np.asarray(scores, dtype=np.float64) - np.max(scores))
    p = e / e.sum()
    return p / p.sum()


def pro_probabilities(
    abs_sum: np.ndarray, count: np.ndarray, *, clip: float = 1000.0, initial: float = 0.0
) -> np.ndarray:
    """FedKSeed-Pro's seed probabilities from the history statistics."""
    return probabilities_from_scores(pro_scores(abs_sum, count, clip=clip, initial=initial))


def scores_to_byte(scores: np.ndarray) -> np.ndarray:
    """ψ̃ in [0, 1] as uint8 codes round(255·ψ̃), what the server sends."""
    return np.rint(np.clip(scores, 0.0, 1.0) * 255.0).astype(np.uint8)


def scores_from_byte(codes: np.ndarray) -> np.ndarray:
    """ψ̃ as both sides use it: code / 255."""
    return np.asarray(codes, dtype=np.float64) / 255.0


# -- one-byte scalars ----------------------------------------------------------------------
def byte_offset(max_abs: float) -> int:
    """The offset C that puts magnitude ``max_abs`` on the top code 127 (0 for no magnitude)."""
    if not (max_abs > 0 and math.isfinite(max_abs)):
        return 0
    return 127 - round(LEVELS_PER_E * math.log(max_abs))


def to_bytes(values: np.ndarray, offset: int) -> np.ndarray:
    """int8 codes q = sign(v)·clip(round(16·ln|v|) + C, 1, 127); zero stays 0."""
    v = np.asarray(values, dtype=np.float64)
    out = np.zeros(v.shape, dtype=np.int8)
    nz = v != 0
    mag = np.rint(LEVELS_PER_E * np.log(np.abs(v[nz]))) + offset
    out[nz] = (np.sign(v[nz]) * np.clip(mag, 1, 127)).astype(np.int8)
    return out


def from_bytes(codes: np.ndarray, offset: int) -> np.ndarray:
    """The float32 values the codes stand for: sign(q)·exp((|q| − C) / 16); 0 stays 0."""
    q = np.asarray(codes, dtype=np.int64)
    out = np.sign(q) * np.exp((np.abs(q) - offset) / LEVELS_PER_E)
    return np.where(q == 0, 0.0, out).astype(np.float32)


# -- the wire format of both halves ------------------------------------------------------
#: Array serialisation of small payloads: raw little-endian bytes, no .npy header.
RAW = "raw"


def wire_array(values: np.ndarray) -> Array:
    """``values`` as a Flower Array of raw little-endian bytes.

    Flower's default serialisation (``np.save``) adds a 128-byte header to every
    array, which is a tenth of a FedKSeed upload; this one costs ~45 bytes.
    """
    v = np.ascontiguousarray(values)
    v = v.astype(v.dtype.newbyteorder("<"), copy=False)
    return Array(dtype=v.dtype.name, shape=tuple(v.shape), stype=RAW, data=v.tobytes())


def wire_values(array: Array) -> np.ndarray:
    """The numpy array an Array carries (raw bytes or Flower's own serialisation)."""
    if array.stype != RAW:
        return array.numpy()
    dtype = np.dtype(array.dtype).newbyteorder("<")
    return np.frombuffer(array.data, dtype=dtype).reshape(tuple(array.shape))


class Wire:
    """Names of what FedKSeed messages carry (short: every byte is counted)."""

    #: Content key of the server's payload (an ArrayRecord).
    PAYLOAD = "zo"
    ACC = "zo.A"  # down: accumulators (float32, or int8 one-byte codes)
    INDEX = "zo.i"  # down (changed-only sync) and up: seed indices, as gaps
    SCORES = "zo.p"  # down: FedKSeed-Pro's ψ̃ as uint8
    SCALAR = "zo.g"  # up: accumulated ĝ per seed used (float32, or int8 codes)
    ABS = "zo.a"  # up (Pro): accumulated |clip(ĝ)| per seed used
    COUNT = "zo.n"  # up (Pro): steps per seed used
    OFFSET = "zo.o"  # up (one byte): offsets of zo.g and zo.a, int16
    # round config
    SEED = "zo-seed"
    K = "zo-k"
    VERSION = "zo-version"
    BASE = "zo-base"
    BYTE_OFFSET = "zo-offset"


def encode_reply(
    picks: Sequence[int],
    grads: Sequence[float | None],
    *,
    k: int,
    pro: bool = False,
    one_byte: bool = False,
    clip: float = 1000.0,
) -> dict[str, np.ndarray]:
    """A client's upload: per seed used, its index and Σĝ; with Pro also Σ|clip ĝ| and the count.

    ``picks[t]`` is the seed index of step t and ``grads[t]`` its ĝ (None: skipped).
    Scalars are float32, or int8 codes with their offsets under :attr:`Wire.OFFSET`.
    """
    acc = np.zeros(k, dtype=np.float64)
    absum = np.zeros(k, dtype=np.float64)
    count = np.zeros(k, dtype=np.int64)
    for j, g in zip(picks, grads, strict=True):
        if g is not None:
            acc[j] += g
            absum[j] += min(abs(g), clip)
            count[j] += 1
    used = np.flatnonzero(count)
    out = {Wire.INDEX: pack_indices(used, k)}
    offsets = []
    for key, values in ((Wire.SCALAR, acc), (Wire.ABS, absum))[: 2 if pro else 1]:
        if one_byte:
            off = byte_offset(float(np.abs(values[used]).max(initial=0.0)))
            out[key] = to_bytes(values[used], off)
            offsets.append(off)
        else:
            out[key] = values[used].astype(np.float32)
    if pro:
        out[Wire.COUNT] = count[used].astype(np.uint8 if count.max() < 256 else np.uint16)
    if one_byte:
        out[Wire.OFFSET] = np.asarray(offsets, dtype=np.int16)
    return out


def decode_reply(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """An upload as ``idx``, ``g`` (and ``abs``, ``n``), codes reconstructed; None if absent."""
    if Wire.INDEX not in arrays or Wire.SCALAR not in arrays:
        return None
    offsets = np.asarray(arrays[Wire.OFFSET]).tolist() if Wire.OFFSET in arrays else []
    out = {"idx": unpack_indices(arrays[Wire.INDEX])}
    for name, key in (("g", Wire.SCALAR), ("abs", Wire.ABS)):
        if key in arrays:
            values = np.asarray(arrays[key])
            if values.dtype == np.int8:
                values = from_bytes(values, int(offsets.pop(0)))
            out[name] = values.astype(np.float64)
    if Wire.COUNT in arrays:
        out["n"] = np.asarray(arrays[Wire.COUNT]).astype(np.int64)
    return out
