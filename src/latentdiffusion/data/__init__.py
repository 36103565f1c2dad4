"""Data sets: registered IDX releases, image folders and .npz files, all loaded into one
validated `Dataset` of uint8 images and optional labels."""

from .dataset import Dataset, load_dataset
from .images import Split, to_uint8, to_unit_tensor
from .registry import DATA_DIR_ENV, DATASETS, download, resolve_data_dir, verify

__all__ = ["DATASETS", "DATA_DIR_ENV", "Dataset", "Split", "download", "load_dataset",
           "resolve_data_dir", "to_uint8", "to_unit_tensor", "verify"]
