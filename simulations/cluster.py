"""A sweep's federations as Ray tasks on an existing cluster, gathered as they finish.

``fedsilo-simulate sweep --ray-address HOST:PORT`` connects to a cluster started
with ``ray start`` (``ray.init(address=...)``) and submits one Ray task per
federation, declaring what it needs (``task_resources``). A task runs
``fedsilo.simulations.sweep.run_task`` in a scratch directory on whichever node Ray
chose, and sends back its tidy rows, the node it ran on and its run directory
(packed), so the nodes need no shared filesystem: only fedsilo installed (the
same version) in the Python that ``ray start`` ran under. Ray is imported only
here, so a local sweep never pays its start-up.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedsilo.common.errors import FedsiloError
from fedsilo.runtime.processes import QUIET
from fedsilo.simulations.sweep_spec import SweepSpec, Task
from fedsilo.simulations.sweep_store import TaskRecord


def task_resources(spec: SweepSpec) -> dict[str, float]:
    """What one federation needs from the cluster: one CPU (the in-process engine is one process).

    No GPU: fedsilo's models train on the CPU (``fedsilo.common.training`` places nothing on
    an accelerator), so asking for one would only idle it.
    """
    return {"num_cpus": 1, "num_gpus": 0}


def pack(folder: Path) -> bytes:
    """A folder as a gzipped tar archive, in memory (a run directory: a few hundred KB)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname=".")
    return buffer.getvalue()


def unpack(archive: bytes, folder: Path) -> None:
    """Unpack ``pack``'s archive into ``folder`` (replacing what was there)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(folder, filter="data")


def run_remote(spec: SweepSpec, task: Task) -> tuple[TaskRecord, bytes]:
    """The body of one Ray task: run the federation in scratch space; its record and packed run directory."""
    import ray

    from fedsilo.simulations.sweep import run_recorded

    with tempfile.TemporaryDirectory(prefix="fedsilo-task-") as scratch:
        record = run_recorded(spec, task, scratch)
        archive = pack(Path(scratch) / "runs" / task.run_id)
    return replace(record, ran_on={**record.ran_on, "node_id": ray.get_runtime_context().get_node_id()}), archive


def check_reachable(address: str, *, timeout: float = 5.0) -> None:
    """Fail fast if nothing listens at a ``HOST:PORT`` address (Ray itself retries for minutes).

    Other forms (``auto``, ``ray://...``) are left to Ray.
    """
    host, _, port = address.rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise FedsiloError(
            f"no Ray cluster answers at {address!r} ({err.strerror or err}); start its head with "
            "`ray start --head --port PORT` and pass HOST:PORT, or leave out --ray-address to run here"
        ) from None


def connect(address: str) -> Any:
    """Join the Ray cluster at ``address`` as a driver; return the ``ray`` module."""
    check_reachable(address)
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    import ray

    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise FedsiloError(
            f"cannot join the Ray cluster at {address!r} ({err}); start one with `ray start --head --port PORT` "
            "and pass --ray-address HOST:PORT"
        ) from None
    return ray


def run_on_ray(
    spec: SweepSpec,
    tasks: list[Task],
    out_dir: Path,
    arrived: Callable[[Task, TaskRecord], None],
    failed: Callable[[Task, BaseException], None],
) -> None:
    """Run ``tasks`` on the cluster at ``spec.ray_address``; hand each result over as it arrives.

    Tasks are spread over the nodes (``SPREAD``). A task that raises is handed to
    ``failed`` with its original exception; an interrupted sweep cancels what has
    not finished and leaves the cluster running.
    """
    if not tasks:
        return
    ray = connect(spec.ray_address)
    try:
        remote = ray.remote(**task_resources(spec), scheduling_strategy="SPREAD")(run_remote)
        pending = {remote.remote(spec, task): task for task in tasks}
        try:
            while pending:
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                task = pending.pop(ready)
                try:
                    record, archive = ray.get(ready)
                except ray.exceptions.RayTaskError as err:
                    failed(task, err.cause if isinstance(err.cause, BaseException) else err)
                except ray.exceptions.RayError as err:  # a node or worker lost, beyond Ray's retries
                    failed(task, err)
                else:
                    unpack(archive, out_dir / "runs" / task.run_id)
                    arrived(task, record)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
    finally:
        ray.shutdown()
