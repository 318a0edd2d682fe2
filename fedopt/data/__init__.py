"""Datasets, local-file loaders and client partitioning; importing registers all of them."""

from fedopt.data import builtin, files, images, partition
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
)

__all__ = [
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
    "plot_label_heatmap",
    "split_client",
]
