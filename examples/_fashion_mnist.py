"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, for the full-size reproductions.

Nothing is downloaded: the files are read from where the package installs them
(``dpkg -L dataset-fashion-mnist``), and a missing package gives a message saying
how to install it. Not an example on its own; the reproduction scripts import it.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class FashionMNISTMissingError(FileNotFoundError):
    """The Debian package is not installed (or installs elsewhere)."""


def fashion_mnist_available(directory: Path = FASHION_MNIST_DIR) -> bool:
    """Whether all four files of the data set are present."""
    return all((directory / name).is_file() for pair in _FILES.values() for name in pair)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped): big-endian dims after a magic number, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(
    split: str = "train", flatten: bool = True, directory: Path = FASHION_MNIST_DIR
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)`` of ``split`` (``"train"``: 60,000 images, ``"test"``: 10,000).

    ``X`` is float32 in ``[0, 1]``, ``[N, 784]`` (``flatten``) or ``[N, 1, 28, 28]``;
    ``y`` is int64 ``[N]`` with the 10 class labels.
    """
    if split not in _FILES:
        raise ValueError(f"split={split!r} is not one of {tuple(_FILES)}")
    if not fashion_mnist_available(directory):
        raise FashionMNISTMissingError(
            f"Fashion-MNIST not found in {directory}: install Debian's package with "
            "`sudo apt install dataset-fashion-mnist` (hbpkit never downloads data), "
            "or run the CI-sized version on sklearn's digits"
        )
    images, labels = (directory / name for name in _FILES[split])
    X = torch.from_numpy(_read_idx(images).astype(np.float32) / 255.0)
    y = torch.from_numpy(_read_idx(labels).astype(np.int64))
    return (X.reshape(len(X), -1) if flatten else X.unsqueeze(1)), y
