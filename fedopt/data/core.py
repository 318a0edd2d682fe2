"""Dataset types and the dataset, partition, client-split and label-histogram entry points."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fedopt.errors import ConfigError
from fedopt.params import build
from fedopt.registry import DATASETS, PARTITIONERS, Entry

if TYPE_CHECKING:
    from fedopt.data.population import ClientPool

__all__ = [
    "Dataset",
    "TextSpec",
    "TaskData",
    "holdout",
    "label_histogram",
    "load_task_data",
    "partition_clients",
    "plot_label_heatmap",
    "seed32",
    "split_client",
    "split_sizes",
]


def seed32(seed: int) -> int:
    """Map any integer seed onto ``[0, 2**32)``, the range numpy and scikit-learn accept."""
    return int(seed) % 2**32


@dataclass(frozen=True)
class TextSpec:
    """What a token-id dataset is: its objective and its tokenizer's vocabulary.

    Attributes
    ----------
    kind : {"lm", "classify"}
        ``lm``: causal language modelling, ``y`` holds each position's next-token label
        (:data:`~fedopt.training.IGNORE_INDEX` where nothing is predicted);
        ``classify``: one label per sequence.
    vocab_size : int
        Token ids lie in ``[0, vocab_size)``.
    pad_id : int
        The id that fills sequences up to their length (masked from attention).
    tokenizer : str
        The tokenizer's description (``"bytes"``, a directory), part of cache keys.
    """

    kind: Literal["lm", "classify"]
    vocab_size: int
    pad_id: int
    tokenizer: str = "bytes"


@dataclass(frozen=True)
class Dataset:
    """Examples of one task: features, integer labels and optional natural group ids.

    Attributes
    ----------
    x : numpy.ndarray
        float32 features of shape ``(n, *input_shape)``; images are channel-first.
        For text (``text`` set), int64 token ids of shape ``(n, seq_len)``.
    y : numpy.ndarray
        int64 labels of shape ``(n,)`` in ``[0, num_classes)``; for language
        modelling, next-token labels of shape ``(n, seq_len)`` (``-100``: not counted).
    num_classes : int
        Number of classes of the task (the vocabulary size for language modelling).
    natural_id : numpy.ndarray or None
        Per-example group id (ints or strings), e.g. the user who wrote it.
    name : str
        What the examples are, for error messages (``"digits"``, ``"npz file a.npz"``).
    text : TextSpec or None
        Set for token-id datasets.
    groups : numpy.ndarray or None
        Per-example class in ``[0, num_groups)`` that label-based partitioners,
        stratified splits and label plots use when ``y`` is not one label per
        example (e.g. a docstring's module family for language modelling).
    num_groups : int
        Number of such classes.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    natural_id: np.ndarray | None = None
    name: str = ""
    text: TextSpec | None = None
    groups: np.ndarray | None = None
    num_groups: int = 0

    def __post_init__(self) -> None:
        x = np.asarray(self.x, dtype=np.float32 if self.text is None else np.int64)
        y = np.asarray(self.y, dtype=np.int64)
        per_token = self.text is not None and self.text.kind == "lm"
        if x.ndim < 2 or y.ndim != (2 if per_token else 1) or len(x) != len(y):
            want = "(n, seq_len)" if per_token else "(n,)"
            raise ValueError(
                f"need x of shape (n, ...) and y of shape {want}, got {x.shape}, {y.shape}"
            )
        counted = y[y != -100] if per_token else y
        if counted.size and (counted.min() < 0 or counted.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got {counted.min()}..{counted.max()}"
            )
        if self.text is not None and x.size and (x.min() < 0 or x.max() >= self.text.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.text.vocab_size}), got {x.min()}..{x.max()}"
            )
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        for field in ("natural_id", "groups"):
            value = getattr(self, field)
            if value is not None:
                ids = np.asarray(value)
                if ids.shape != (len(y),):
                    raise ValueError(f"{field} must have shape {(len(y),)}, got {ids.shape}")
                object.__setattr__(self, field, ids)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def labels(self) -> np.ndarray:
        """One class per example: ``y``, or ``groups`` when ``y`` holds token labels."""
        if self.y.ndim == 1:
            return self.y
        if self.groups is None:
            raise ConfigError(
                "partition.name",
                self.name or "this dataset",
                "a partitioner that needs no class per example (iid, quantity, natural): "
                "these examples have token labels and no groups",
            )
        return self.groups

    @property
    def num_labels(self) -> int:
        """Number of classes of :attr:`labels`."""
        return self.num_classes if self.y.ndim == 1 else self.num_groups

    def __len__(self) -> int:
        return int(len(self.y))

    def subset(self, idx: np.ndarray) -> Dataset:
        """Return the examples at ``idx`` (same classes, ids and name)."""
        idx = np.asarray(idx, dtype=np.int64)

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return dataclasses.replace(
            self,
            x=self.x[idx],
            y=self.y[idx],
            natural_id=pick(self.natural_id),
            groups=pick(self.groups),
        )


@dataclass(frozen=True)
class TaskData:
    """A loaded task: the pool partitioned among clients and the central test set.

    ``public``, when a loader provides it, is data disjoint from both that a
    central warm start may train on (``[pretrain]``). ``clients``, set by a
    population dataset (:mod:`fedopt.data.population`), generates each
    client's examples on demand; ``train`` then holds no examples, only their
    shape and classes.
    """

    name: str
    train: Dataset
    test: Dataset
    public: Dataset | None = None
    clients: ClientPool | None = None


def _resolve(entry: Entry[Any], params: Any, where: str) -> Any:
    """Accept a params instance, a raw mapping or ``None`` (defaults) for ``entry``."""
    if params is None or isinstance(params, Mapping):
        return build(entry.params, params, where)
    if not isinstance(params, entry.params):
        raise TypeError(
            f"{where} '{entry.name}' takes {entry.params.__name__}, got {type(params).__name__}"
        )
    return params


def holdout(
    data: Dataset, *, test_fraction: float, seed: int, stratify: bool = True
) -> tuple[Dataset, Dataset]:
    """Split ``data`` into (train, test) with scikit-learn's ``train_test_split``.

    The split is stratified by label when ``stratify`` is set and every class
    can be represented on both sides; otherwise it is a seeded random split.
    The test side gets ``ceil(test_fraction * n)`` examples.

    Raises
    ------
    ConfigError
        ``data.test_fraction`` outside (0, 1) or leaving one side empty.
    """
    from sklearn.model_selection import train_test_split

    n = len(data)
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(
            "data.test_fraction", test_fraction, "a fraction strictly between 0 and 1"
        )
    n_test = int(np.ceil(test_fraction * n))
    if n_test >= n:
        raise ConfigError(
            "data.test_fraction",
            test_fraction,
            f"a fraction that leaves training examples among the {n} of {data.name or 'the data'}",
        )
    labels = data.labels
    counts = np.bincount(labels, minlength=data.num_labels)
    present = int((counts > 0).sum())
    can_stratify = counts[counts > 0].min() >= 2 and min(n_test, n - n_test) >= present
    strat = labels if stratify and can_stratify else None
    tr, te = train_test_split(
        np.arange(n), test_size=test_fraction, random_state=seed32(seed), stratify=strat
    )
    return data.subset(np.sort(tr)), data.subset(np.sort(te))


def load_task_data(name: str, params: Any, *, test_fraction: float, seed: int) -> TaskData:
    """Load the registered dataset ``name`` with its ``params``.

    Parameters
    ----------
    name : str
        A name registered in :data:`fedopt.registry.DATASETS`.
    params : object, Mapping or None
        The dataset's params dataclass instance (a mapping or ``None`` is built).
    test_fraction : float
        Share held out as the central test set (loaders with their own test file ignore it).
    seed : int
        Seed of every random choice the loader makes.

    Returns
    -------
    TaskData
        With ``train.name`` and ``test.name`` set (to ``name`` when the loader left them empty).
    """
    entry = DATASETS.get(name, key="data.name")
    task = entry.obj(_resolve(entry, params, "data"), test_fraction=test_fraction, seed=seed)
    train = task.train if task.train.name else dataclasses.replace(task.train, name=name)
    test = task.test if task.test.name else dataclasses.replace(task.test, name=name)
    if train.input_shape != test.input_shape or train.num_classes != test.num_classes:
        raise ValueError(f"dataset '{name}' returned train and test sets that do not match")
    return TaskData(task.name, train, test, task.public, task.clients)


def data_params(scenario: Any) -> Any:
    """The scenario's dataset parameters, bound to the rest of the scenario.

    A loader may carry a ``bind_scenario(params, scenario)`` attribute that
    resolves parameters depending on other sections (a text dataset's
    ``tokenizer = "auto"`` takes the tokenizer saved beside a local model).
    """
    bind = getattr(DATASETS.get(scenario.data.name, key="data.name").obj, "bind_scenario", None)
    return scenario.data.params if bind is None else bind(scenario.data.params, scenario)


def partition_clients(
    train: Dataset, name: str, params: Any, *, num_clients: int, seed: int
) -> list[np.ndarray]:
    """Split ``train`` among ``num_clients`` clients with the registered partitioner ``name``.

    Returns
    -------
    list of numpy.ndarray
        ``num_clients`` sorted int64 index arrays into ``train``, none empty, no index twice.

    Raises
    ------
    ConfigError
        Unknown partitioner, ``num_clients`` below 1 or above ``len(train)``, bad
        parameters, or a client left without examples.
    """
    entry = PARTITIONERS.get(name, key="partition.name")
    what = train.name or "the training set"
    if num_clients < 1:
        raise ConfigError("partition.num_clients", num_clients, "at least 1")
    if num_clients > len(train):
        raise ConfigError(
            "partition.num_clients",
            num_clients,
            f"at most the {len(train)} training examples of {what}",
        )
    raw = entry.obj(train, _resolve(entry, params, "partition"), num_clients=num_clients, seed=seed)
    if len(raw) != num_clients:
        raise ValueError(f"partitioner '{name}' returned {len(raw)} parts for {num_clients}")
    parts = [np.sort(np.asarray(p, dtype=np.int64).reshape(-1)) for p in raw]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(
            "partition.name",
            name,
            f"a partition that gives each of the {num_clients} clients an example; "
            f"'{name}' left client(s) {empty} of {what} empty: use fewer clients "
            "(partition.num_clients) or partition parameters that spread examples more evenly",
        )
    flat = np.concatenate(parts)
    if flat.min() < 0 or flat.max() >= len(train) or len(np.unique(flat)) != len(flat):
        raise ValueError(f"partitioner '{name}' returned out-of-range or repeated indices")
    if len(flat) < len(train):
        warnings.warn(
            f"partitioner '{name}' left {len(train) - len(flat)} of the {len(train)} "
            f"training examples of {what} unassigned",
            stacklevel=2,
        )
    return parts


def split_client(
    indices: np.ndarray, *, test_fraction: float, seed: int, cid: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's ``indices`` into sorted (train, test) parts, seeded by (seed, cid).

    The test part gets ``round(test_fraction * len(indices))`` examples, reduced so
    that the train part keeps at least one; ``test_fraction == 0`` gives an empty test part.

    Raises
    ------
    ConfigError
        ``partition.test_fraction`` outside [0, 1).
    """
    indices = np.asarray(indices, dtype=np.int64)
    n_test = int(split_sizes(np.array([len(indices)]), test_fraction=test_fraction)[1][0])
    if n_test == 0:
        return np.sort(indices), np.empty(0, dtype=np.int64)
    perm = np.random.default_rng([seed32(seed), seed32(cid)]).permutation(len(indices))
    return np.sort(indices[perm[n_test:]]), np.sort(indices[perm[:n_test]])


def split_sizes(sizes: np.ndarray, *, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The (train, test) sizes :func:`split_client` gives clients of ``sizes`` examples.

    Raises
    ------
    ConfigError
        ``partition.test_fraction`` outside [0, 1).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError("partition.test_fraction", test_fraction, "a fraction in [0, 1)")
    sizes = np.asarray(sizes, dtype=np.int64)
    n_test = np.minimum(np.rint(test_fraction * sizes).astype(np.int64), np.maximum(sizes - 1, 0))
    return sizes - n_test, n_test


def label_histogram(y: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Count each class in each part: an int64 array of shape (len(parts), num_classes)."""
    y = np.asarray(y, dtype=np.int64)
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    for row, idx in enumerate(parts):
        hist[row] = np.bincount(y[np.asarray(idx, dtype=np.int64)], minlength=num_classes)
    return hist


def plot_label_heatmap(hist: np.ndarray, path: Path, *, title: str) -> Path:
    """Draw ``hist`` (clients x classes) as a PNG heatmap at ``path`` and return the path.

    Clients are rows (y axis), classes columns (x axis); counts are written in the
    cells when the table has at most 400 cells.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hist = np.asarray(hist)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, cols = hist.shape
    fig = Figure(figsize=(min(2 + 0.6 * cols, 20), min(1.5 + 0.35 * rows, 30)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(hist, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="examples")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_title(title)
    if cols <= 40:
        ax.set_xticks(range(cols))
    if rows <= 40:
        ax.set_yticks(range(rows))
    if rows * cols <= 400:
        top = hist.max() if hist.size else 0
        for (r, c), count in np.ndenumerate(hist):
            color = "black" if count > 0.6 * top else "white"
            ax.text(c, r, str(int(count)), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path
