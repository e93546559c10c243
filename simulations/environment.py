"""Keep Flower and Ray inside a private temporary directory, whatever the user's shell says."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedsilo.runtime.processes import QUIET


@contextmanager
def contained_flower() -> Iterator[Path]:
    """Point FLWR_HOME and RAY_TMPDIR at a fresh temp dir; restore and remove it afterwards.

    Ray's socket paths must stay short, so the directory lives in the system temp
    dir, not under the run directory.
    """
    scratch = Path(tempfile.mkdtemp(prefix="fsl-"))
    values = {**QUIET, "RAY_TMPDIR": str(scratch / "ray"), "FLWR_HOME": str(scratch / "flwr")}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield scratch
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        shutil.rmtree(scratch, ignore_errors=True)
