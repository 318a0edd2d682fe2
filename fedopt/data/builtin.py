"""Built-in datasets that need no download: digits, Synthetic(alpha, beta) and blobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedopt.data.core import Dataset, TaskData, holdout, seed32
from fedopt.params import check
from fedopt.registry import DATASETS, NoParams

__all__ = ["BlobsParams", "SyntheticParams", "load_blobs", "load_digits", "load_synthetic"]


def load_digits(params: NoParams, *, test_fraction: float, seed: int) -> TaskData:
    """Scikit-learn's bundled 8x8 handwritten digits, 10 classes, pixels scaled to [0, 1].

    The central test set is a stratified holdout of ``test_fraction``.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    data = Dataset(x, bunch.target.astype(np.int64), 10, name="digits")
    train, test = holdout(data, test_fraction=test_fraction, seed=seed, stratify=True)
    return TaskData("digits", train, test)


@dataclass(frozen=True)
class SyntheticParams:
    """Parameters of the Synthetic(alpha, beta) federated benchmark.

    Attributes
    ----------
    alpha : float
        Standard deviation of each user's model mean ``u_k`` (model heterogeneity).
    beta : float
        Standard deviation of each user's feature-mean centre ``B_k`` (feature heterogeneity).
    num_users : int
        Number of users (natural clients).
    dim : int
        Number of features.
    num_classes : int
        Number of classes.
    max_samples_per_user : int
        Cap on the lognormal(4, 2) + 50 examples of each user.
    iid : bool
        Share one model and one (zero) feature mean among all users.
    """

    alpha: float = 1.0
    beta: float = 1.0
    num_users: int = 30
    dim: int = 60
    num_classes: int = 10
    max_samples_per_user: int = 1000
    iid: bool = False

    def __post_init__(self) -> None:
        check_synthetic_knobs(self)
        check(self.num_users >= 1, "num_users", self.num_users, "an integer >= 1")


def check_synthetic_knobs(p: Any) -> None:
    """The knobs Synthetic(alpha, beta) shares pooled and lazy: one-line errors for bad values."""
    check(p.alpha >= 0, "alpha", p.alpha, "a number >= 0")
    check(p.beta >= 0, "beta", p.beta, "a number >= 0")
    check(p.dim >= 1, "dim", p.dim, "an integer >= 1")
    check(p.num_classes >= 2, "num_classes", p.num_classes, "an integer >= 2")
    check(
        p.max_samples_per_user >= 1,
        "max_samples_per_user",
        p.max_samples_per_user,
        "an integer >= 1",
    )


def generate_synthetic(p: SyntheticParams, rng: np.random.Generator) -> Dataset:
    """Draw the Synthetic(alpha, beta) examples of all users (FedProx / LEAF generator).

    User ``k`` has ``W_k ~ N(u_k, 1)``, ``b_k ~ N(u_k, 1)`` with ``u_k ~ N(0, alpha^2)``,
    features ``x ~ N(v_k, Sigma)`` with ``v_k[j] ~ N(B_k, 1)``, ``B_k ~ N(0, beta^2)``
    and ``Sigma = diag(j^-1.2)``, and labels ``argmax(W_k^T x + b_k)`` (the argmax of
    the softmax). In the iid variant all users share ``W, b ~ N(0, 1)`` and ``v = 0``.
    """
    users, dim, classes = p.num_users, p.dim, p.num_classes
    sizes = rng.lognormal(4, 2, users).astype(np.int64) + 50
    sizes = np.minimum(sizes, p.max_samples_per_user)
    mean_w = rng.normal(0.0, p.alpha, users)
    centre = rng.normal(0.0, p.beta, users)
    std_x = np.arange(1, dim + 1, dtype=np.float64) ** (-1.2 / 2)
    if p.iid:
        means = np.zeros((users, dim))
    else:
        means = rng.normal(centre[:, None], 1.0, (users, dim))
    shared_w = rng.normal(0.0, 1.0, (dim, classes))
    shared_b = rng.normal(0.0, 1.0, classes)
    xs, ys = [], []
    for k in range(users):
        if p.iid:
            w, b = shared_w, shared_b
        else:
            w = rng.normal(mean_w[k], 1.0, (dim, classes))
            b = rng.normal(mean_w[k], 1.0, classes)
        x = means[k] + rng.standard_normal((int(sizes[k]), dim)) * std_x
        xs.append(x)
        ys.append(np.argmax(x @ w + b, axis=1))
    ids = np.repeat(np.arange(users, dtype=np.int64), sizes)
    x_all = np.concatenate(xs).astype(np.float32)
    return Dataset(x_all, np.concatenate(ys), classes, ids, name="synthetic")


def load_synthetic(params: SyntheticParams, *, test_fraction: float, seed: int) -> TaskData:
    """Synthetic(alpha, beta) federated benchmark with one natural id per user.

    The central test set is a seeded random holdout of ``test_fraction``.
    """
    data = generate_synthetic(params, np.random.default_rng(seed32(seed)))
    train, test = holdout(data, test_fraction=test_fraction, seed=seed, stratify=False)
    return TaskData("synthetic", train, test)


@dataclass(frozen=True)
class BlobsParams:
    """Parameters of the ``blobs`` classification task (scikit-learn ``make_classification``).

    Attributes
    ----------
    num_examples : int
        Number of examples before the holdout.
    num_features : int
        Number of (all informative) features.
    num_classes : int
        Number of classes, at most ``2 ** num_features``.
    class_sep : float
        Distance between the class clusters (larger is easier).
    """

    num_examples: int = 2000
    num_features: int = 20
    num_classes: int = 4
    class_sep: float = 1.0

    def __post_init__(self) -> None:
        check(self.num_features >= 1, "num_features", self.num_features, "an integer >= 1")
        check(
            2 <= self.num_classes <= 2 ** min(self.num_features, 30),
            "num_classes",
            self.num_classes,
            f"an integer from 2 to 2 ** num_features = {2 ** min(self.num_features, 30)}",
        )
        check(
            self.num_examples >= 2 * self.num_classes,
            "num_examples",
            self.num_examples,
            f"an integer >= 2 * num_classes = {2 * self.num_classes}",
        )
        check(self.class_sep > 0, "class_sep", self.class_sep, "a number > 0")


def load_blobs(params: BlobsParams, *, test_fraction: float, seed: int) -> TaskData:
    """Fast synthetic classification (``make_classification``) with a stratified holdout."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=params.num_examples,
        n_features=params.num_features,
        n_informative=params.num_features,
        n_redundant=0,
        n_repeated=0,
        n_classes=params.num_classes,
        n_clusters_per_class=1,
        class_sep=params.class_sep,
        flip_y=0.0,
        random_state=seed32(seed),
    )
    data = Dataset(x.astype(np.float32), y.astype(np.int64), params.num_classes, name="blobs")
    train, test = holdout(data, test_fraction=test_fraction, seed=seed, stratify=True)
    return TaskData("blobs", train, test)


DATASETS.register("digits", load_digits, params=NoParams)
DATASETS.register("synthetic", load_synthetic, params=SyntheticParams)
DATASETS.register("blobs", load_blobs, params=BlobsParams)
