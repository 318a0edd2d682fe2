"""Datasets, local-file loaders, generated populations and client partitioning (all registered)."""

from fedopt.data import builtin, files, images, partition, population
from fedopt.data.core import (
    Dataset,
    TaskData,
    TextSpec,
    data_params,
    holdout,
    label_histogram,
    load_task_data,
    partition_clients,
    plot_label_heatmap,
    split_client,
    split_sizes,
)
from fedopt.data.population import ClientPool

__all__ = [
    "ClientPool",
    "Dataset",
    "TaskData",
    "TextSpec",
    "data_params",
    "builtin",
    "files",
    "holdout",
    "images",
    "label_histogram",
    "load_task_data",
    "partition",
    "partition_clients",
    "population",
    "plot_label_heatmap",
    "split_client",
    "split_sizes",
]
