"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (IDX files, read as they are)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fedsilo.common.errors import ConfigError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _idx(path: Path, header: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            return np.frombuffer(fh.read(), dtype=np.uint8, offset=header)
    except FileNotFoundError:
        raise ConfigError(
            f"{path} not found: Fashion-MNIST comes from Debian's package dataset-fashion-mnist; "
            "install it with `apt-get install dataset-fashion-mnist`"
        ) from None


def load_fashion_mnist(split: str, directory: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 in [0, 1], shape (N, 28, 28), and int64 labels; ``split`` is train or test."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ConfigError(f"Fashion-MNIST split {split!r}: use 'train' or 'test'")
    images = _idx(directory / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _idx(directory / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    if len(images) != len(labels):
        raise ConfigError(f"{directory}: {len(images)} images but {len(labels)} labels; reinstall the package")
    return images.astype(np.float32) / 255.0, labels
