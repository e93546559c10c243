"""The cost of DP-SGD: seconds per epoch with Opacus against the same training without DP.

For the tabular MLP (German credit, as the federation encodes it) and the
Papernot CNN (28x28 images), each Opacus per-sample-gradient mode that works
here is timed in the same process, one after the other, with the same model,
data, batch size and number of steps. fedsilo trains with the setting
``grad-sample-mode`` (default ``ghost``, the fastest on the MLP); ``ew`` is timed
here but not offered, since Opacus 1.6's expanded weights raise on the empty
batches that Poisson sampling draws. A benchmark: it prints figures and writes
JSON; it never fails on a time.

The CNN's images are Fashion-MNIST's (Debian's ``dataset-fashion-mnist``) by
default; ``--cnn-images synthetic`` times it on seeded random 28x28 images
instead, which need no package: the time of an epoch does not depend on what the
pixels show (same shapes, same operations), so the figures are the same kind
(``make bench-quick`` uses it so that it runs on a fresh clone).

    python -m fedsilo.simulations.benchmarks.dp_overhead --images 60000 --out bench/dp_overhead.json
    python -m fedsilo.simulations.benchmarks.dp_overhead --cnn-images synthetic --images 5000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsilo.common.datasets import load_builtin
from fedsilo.common.errors import ConfigError
from fedsilo.common.images import load_fashion_mnist
from fedsilo.common.models import SmallCNN, build_model
from fedsilo.common.settings import TrainSettings
from fedsilo.simulations.benchmarks import emit, machine

MODES = ("hooks", "functorch", "ew", "ghost")
CNN_IMAGES = ("fashion-mnist", "synthetic")


def cnn_images(source: str, count: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 28x28 images in [0, 1] and their labels: Fashion-MNIST's training images, or seeded random ones."""
    if source == "synthetic":
        rng = np.random.default_rng(seed)
        return rng.random((count, 28, 28), dtype=np.float32), rng.integers(0, 10, count)
    images, labels = load_fashion_mnist("train")
    return images[:count], labels[:count]


def _epoch_seconds(
    make_model: Callable[[], nn.Module], inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, mode: str | None
) -> float:
    """Seconds for one epoch (len(data) / batch_size steps), after one warm-up step."""
    torch.manual_seed(0)
    model = make_model()
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion: Any = nn.CrossEntropyLoss()
    module: nn.Module = model
    if mode is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made = PrivacyEngine(accountant="rdp").make_private(
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=True,
                grad_sample_mode=mode,
            )
        if mode == "ghost":
            module, optimizer, criterion, loader = made
        else:
            module, optimizer, loader = made
    steps = len(loader)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        if len(y) == 0:
            return
        loss = criterion(module(x), y)
        loss.backward()
        optimizer.step()

    batches = iter(loader)
    step(*next(batches))  # warm-up: hooks, allocations
    started = time.perf_counter()
    done = 0
    while done < steps:
        for x, y in batches:
            step(x, y)
            done += 1
            if done == steps:
                break
        batches = iter(loader)
    return time.perf_counter() - started


def measure(
    name: str, make_model: Callable[[], nn.Module], x: np.ndarray, y: np.ndarray, batch: int, repeats: int
) -> dict[str, Any]:
    """Median seconds per epoch of every mode, the modes interleaved ``repeats`` times."""
    inputs, labels = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    times: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    for _ in range(repeats):
        for mode in (None, *MODES):
            key = mode or "non_private"
            if key in errors:
                continue
            try:
                times.setdefault(key, []).append(_epoch_seconds(make_model, inputs, labels, batch, mode))
            except Exception as err:  # a mode Opacus cannot apply to this model: report it, go on
                errors[key] = f"{type(err).__name__}: {str(err)[:160]}"
    baseline = float(np.median(times["non_private"]))
    rows: dict[str, Any] = {"non_private_s": baseline}
    for mode in MODES:
        if mode in errors:
            rows[mode] = {"error": errors[mode]}
        else:
            seconds = float(np.median(times[mode]))
            rows[mode] = {"seconds": seconds, "ratio": seconds / baseline}
        print(f"{name} {mode}: {rows[mode]} (non-private {baseline:.3f} s)", flush=True)
    return {"model": name, "records": len(y), "batch_size": batch, "repeats": repeats, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000, help="28x28 images to time the CNN on.")
    parser.add_argument(
        "--cnn-images",
        choices=CNN_IMAGES,
        default="fashion-mnist",
        help="Fashion-MNIST (needs Debian's dataset-fashion-mnist) or seeded random images (needs nothing).",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved repetitions; the median is reported.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Full backward hook")  # Opacus, inputs need no grad
    torch.set_num_threads(args.threads)
    try:  # before any timing: a missing package fails at once
        ix, iy = cnn_images(args.cnn_images, args.images)
    except ConfigError as err:
        sys.exit(f"error: {err}; or time the CNN on random images: --cnn-images synthetic")
    credit = load_builtin("german-credit")
    cx, cy = credit.schema.transform(credit.frame, source=credit.name)
    mlp = measure(
        "mlp-german-credit",
        lambda: build_model(TrainSettings(model="mlp", hidden_layers="64"), credit.schema, seed=0),
        np.tile(cx, (10, 1)),  # 10,000 records: an epoch long enough to time
        np.tile(cy, 10),
        args.batch_size,
        args.repeats,
    )
    name = "cnn-fashion-mnist" if args.cnn_images == "fashion-mnist" else "cnn-synthetic-28x28"
    cnn = measure(name, SmallCNN, ix, iy, args.batch_size, args.repeats)
    result = {
        "benchmark": "DP-SGD overhead per epoch (Opacus modes against non-private)",
        "machine": machine(threads=args.threads),
        "results": [mlp, cnn],
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
