"""An institution's warm trainer: one long-lived process that trains and evaluates for its ClientApp.

Deployed, Flower starts a fresh ClientApp process for every message, and each
fit or evaluate would import torch, Opacus and scikit-learn and read the records
again (about 5 s of a 2-core machine per message). ``fedsilo-client start``
therefore runs this process beside the SuperNode: it holds those modules and
the institution's records, and the ClientApp hands it the round over a Unix
socket in a private temporary directory (mode 0700).

The trainer runs the same ``fit_round``/``evaluate_round`` as everywhere else,
with the institution's own node config (data, schema, policy, state directory),
never paths from the message: the policy, the budget and the ledger are checked
and written here. It serves one request at a time.

The wire format is two length-prefixed frames each way: a JSON header and the
arrays as an ``.npz`` (read with ``allow_pickle=False``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.common.errors import TrainerError, TrainerUnavailable
from fedsilo.common.settings import Proposal, RunSettings

SOCKET_KEY = "trainer-socket"  # the node-config key that points the ClientApp at its trainer
_LENGTH = struct.Struct("!Q")
MAX_FRAME = 1 << 31


# the wire ------------------------------------------------------------------


def _send(sock: socket.socket, header: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> None:
    body = io.BytesIO()
    np.savez(body, *[np.asarray(a) for a in arrays])
    for frame in (json.dumps(header, default=_plain).encode(), body.getvalue()):
        sock.sendall(_LENGTH.pack(len(frame)) + frame)


def _plain(value: Any) -> Any:
    """numpy scalars in metrics, as plain Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], list[np.ndarray]]:
    frames = []
    for _ in range(2):
        (size,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
        if size > MAX_FRAME:
            raise ConnectionError(f"a frame of {size} bytes is larger than allowed")
        frames.append(_recv_exact(sock, size))
    with np.load(io.BytesIO(frames[1]), allow_pickle=False) as npz:
        arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    return dict(json.loads(frames[0])), arrays


# the ClientApp's side --------------------------------------------------------


def call(
    socket_path: str, op: str, header: Mapping[str, Any], arrays: Sequence[np.ndarray], timeout: float = 3600.0
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Ask the trainer at ``socket_path`` to ``fit`` or ``evaluate``; its answer and arrays."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
            _send(sock, {"op": op, **header}, arrays)
            answer, out = _recv(sock)
        except OSError as err:
            raise TrainerUnavailable(f"the trainer at {socket_path} is not answering: {err}") from err
    if not answer.get("ok"):
        raise TrainerError(str(answer.get("error", "the trainer failed")))
    return answer, out


# the trainer's side ------------------------------------------------------------


class Trainer:
    """Serves ``fit``/``evaluate`` for one institution, keeping its modules and records loaded."""

    def __init__(self, node_config: Mapping[str, Any]) -> None:
        import torch

        torch.set_num_threads(1)
        self.node_config = dict(node_config)
        self._cache: dict[str, Any] = {}

    def _data(self, settings: RunSettings) -> Any:
        """The institution's records for these settings; read again when a file changed."""
        from fedsilo.client.institution import InstitutionData

        stamps = [
            (str(p), stat.st_mtime_ns, stat.st_size)
            for key in ("data-path", "schema-path", "policy-path")
            if (p := self.node_config.get(key)) and (stat := os.stat(p))
        ]
        key = json.dumps([settings.to_config(), stamps], sort_keys=True, default=str)
        if key not in self._cache:
            self._cache = {key: InstitutionData.from_node_config(self.node_config, settings)}  # keep one
        return self._cache[key]

    def handle(self, header: Mapping[str, Any], arrays: list[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
        from fedsilo.client.institution import evaluate_round, fit_round

        # The proposal only: the institution's paths are its own node config's, never the message's.
        settings = RunSettings.of(Proposal.from_config(header["config"]))
        data = self._data(settings)
        if header["op"] == "fit":
            outcome = fit_round(
                data,
                arrays,
                settings,
                server_round=int(header["server-round"]),
                run_id=str(header["run-id"]),
                secure_aggregation=header.get("secure-aggregation"),
                secure_round=_secure_round(header.get("secure-round")),
            )
            self._say(header, outcome.metrics)
            return {"num-examples": outcome.num_examples, "metrics": outcome.metrics}, outcome.weights
        if header["op"] == "evaluate":
            loss, count, metrics = evaluate_round(
                data, arrays, settings, server_round=int(header["server-round"]), run_id=str(header["run-id"])
            )
            return {"loss": loss, "num-examples": count, "metrics": metrics}, []
        raise TrainerError(f"unknown operation {header['op']!r}")

    @staticmethod
    def _say(header: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        what = metrics.get("refused") or f"trained; epsilon spent {float(metrics.get('epsilon', 0.0)):.3f}"
        print(
            f"[{time.strftime('%H:%M:%S')}] run {header['run-id']} round {header['server-round']}: {what}", flush=True
        )

    def serve(self, listener: socket.socket) -> None:
        """Answer requests one at a time until the process is stopped."""
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener was closed: stop serving
                return
            with conn:
                try:
                    header, arrays = _recv(conn)
                except (OSError, ValueError) as err:
                    print(f"trainer: dropped a malformed request: {err}", file=sys.stderr, flush=True)
                    continue
                try:
                    answer, out = self.handle(header, arrays)
                    answer = {"ok": True, **answer}
                except Exception as err:  # every failure goes back to the ClientApp, named
                    answer, out = {"ok": False, "error": f"{type(err).__name__}: {err}"}, []
                try:
                    _send(conn, answer, out)
                except OSError as err:
                    print(f"trainer: could not answer: {err}", file=sys.stderr, flush=True)


def socket_dir() -> Path:
    """A private directory for the trainer's socket (short enough for AF_UNIX's 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="fedsilo-trainer-"))


def wait_ready(socket_path: Path, process: Any, timeout: float = 120.0) -> None:
    """Wait until the trainer accepts connections; raise if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise TrainerError(f"the trainer exited with code {process.returncode} before it was ready")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(str(socket_path)) == 0:
                return
        if time.monotonic() > deadline:
            raise TrainerError(f"the trainer did not start within {timeout:.0f} s")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to listen on (its folder: 0700).")
    parser.add_argument("--node-config", required=True, help="The institution's node config, as JSON.")
    args = parser.parse_args()
    trainer = Trainer(json.loads(args.node_config))
    import fedsilo.client.institution  # noqa: F401 - loaded now, not at the first round

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(args.socket))  # bound last: a connectable socket means ready
        listener.listen(8)
        try:
            trainer.serve(listener)
        except KeyboardInterrupt:
            pass
        finally:
            args.socket.unlink(missing_ok=True)


def _secure_round(value: Any) -> tuple[int, int] | None:
    """The SecAgg+ setup (sampled institutions, threshold) a fit header carries; None: none."""
    if not value:
        return None
    sample, threshold = value
    return int(sample), int(threshold)


if __name__ == "__main__":
    main()
