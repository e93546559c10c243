"""Registries of what a run can name: models, activations, built-in datasets, partitioners.

The shape of Opacus's ``accountants/registry.py``: one table per kind from a
name to what it names, a ``register`` / ``get`` pair, and the settings
(``fedsilo.common.settings``) validate against the table, so a new model, dataset or
partitioner is its own code plus one registration, never a tuple mirrored in
other files. An entry is the object itself (``@MODELS.register("tiny")``) or a
lazy ``"module:attribute"`` reference, imported on first ``get``: the built-ins
below are registered that way, so that reading the settings (which only asks
for the names) imports neither torch nor pandas.

Adding a built-in model: write its ``fedsilo.common.models.ModelKind`` (an ``nn.Module``
class and how to build it for a schema) in ``fedsilo.common.models`` or a module of its
own, then add one ``MODELS.register`` line below. A built-in dataset: its schema
in ``common/data/``, a ``fedsilo.common.datasets.BuiltinDataset`` (schema file and
loader), and one ``DATASETS.register`` line. A partitioner: a function of
``fedsilo.common.partition``'s ``Partitioner`` shape and one ``PARTITIONERS.register``
line (its ``usage`` is what error messages show). Engines have their own table
in ``fedsilo.simulations.engines``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

from fedsilo.common.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from fedsilo.common.datasets import BuiltinDataset
    from fedsilo.common.models import ModelKind
    from fedsilo.common.partition import Partitioner

T = TypeVar("T")
_O = TypeVar("_O")


class Registry(Generic[T]):
    """Names of one kind (``kind``: "model", "dataset", ...) and what each names, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}  # the object, or a "module:attribute" not yet imported
        self._usage: dict[str, str] = {}

    @overload
    def register(
        self, name: str, target: None = None, *, usage: str = "", replace: bool = False
    ) -> Callable[[_O], _O]: ...

    @overload
    def register(self, name: str, target: T | str, *, usage: str = "", replace: bool = False) -> None: ...

    def register(
        self, name: str, target: T | str | None = None, *, usage: str = "", replace: bool = False
    ) -> Callable[[_O], _O] | None:
        """Register ``target`` (an object, or ``"module:attribute"`` imported on first use) as ``name``.

        Without ``target``, a decorator that registers what it decorates. ``usage``
        is how the name is written where it takes an argument (``"dirichlet:ALPHA"``).
        A name registered twice raises ``ValueError`` unless ``replace``.
        """
        if not name or name != name.strip():
            raise ValueError(f"a {self.kind} name must be non-empty, without surrounding spaces. Found {name!r}.")
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to replace it")
        if target is None:

            def decorator(obj: _O) -> _O:
                self._add(name, obj, usage)
                return obj

            return decorator
        self._add(name, target, usage)
        return None

    def _add(self, name: str, target: object, usage: str) -> None:
        self._entries[name] = target
        self._usage[name] = usage or name

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a temporary entry clean up with this)."""
        self._entries.pop(name, None)
        self._usage.pop(name, None)

    def get(self, name: str) -> T:
        """What ``name`` names; ``ConfigError`` listing the registered names if it names nothing."""
        if name not in self._entries:
            raise self.unknown(name)
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attribute = target.partition(":")
            target = getattr(importlib.import_module(module), attribute)
            self._entries[name] = target
        return cast(T, target)

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order (imports nothing)."""
        return tuple(self._entries)

    def usage(self, conjunction: str = "or") -> str:
        """The names as a person writes them, e.g. ``iid, dirichlet:ALPHA or column:NAME``."""
        forms = [self._usage[n] for n in self._entries]
        return ", ".join(forms[:-1]) + f" {conjunction} {forms[-1]}" if len(forms) > 1 else "".join(forms)

    def unknown(self, name: str, *, alternative: str = "") -> ConfigError:
        """The error for a name nothing is registered as, listing what is."""
        listed = self.usage() if not alternative else f"{', '.join(self._usage.values())} or {alternative}"
        return ConfigError(f"unknown {self.kind} {name!r}; use {listed}")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


MODELS: Registry[ModelKind] = Registry("model")
MODELS.register("linear", "fedsilo.common.models:LINEAR")
MODELS.register("mlp", "fedsilo.common.models:MLP")
MODELS.register("cnn", "fedsilo.common.models:CNN")

# "tanh" is the tempered sigmoid s * sigmoid(T * x) - o of Papernot et al. (AAAI 2021)
# at their defaults s = 2, T = 2, o = 1, which is exactly tanh(x).
ACTIVATIONS: Registry[type[nn.Module]] = Registry("activation")
ACTIVATIONS.register("relu", "torch.nn:ReLU")
ACTIVATIONS.register("tanh", "torch.nn:Tanh")

DATASETS: Registry[BuiltinDataset] = Registry("dataset")
DATASETS.register("breast-cancer", "fedsilo.common.datasets:BREAST_CANCER")
DATASETS.register("german-credit", "fedsilo.common.datasets:GERMAN_CREDIT")
DATASETS.register("digits", "fedsilo.common.datasets:DIGITS")
# All 70,000 images (train and test files together); or the official training split only,
# to test on the official 10,000 test images as the literature does.
DATASETS.register("fashion-mnist", "fedsilo.common.datasets:FASHION_MNIST")
DATASETS.register("fashion-mnist-train", "fedsilo.common.datasets:FASHION_MNIST_TRAIN")
# What a dataset setting names when it names no built-in dataset: a table file (fedsilo.common.datasets).
TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")

PARTITIONERS: Registry[Partitioner] = Registry("partition")
PARTITIONERS.register("iid", "fedsilo.common.partition:iid")
PARTITIONERS.register("dirichlet", "fedsilo.common.partition:dirichlet", usage="dirichlet:ALPHA")
PARTITIONERS.register("column", "fedsilo.common.partition:by_column", usage="column:NAME")
