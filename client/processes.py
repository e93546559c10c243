"""An institution's processes: its SuperNode and warm trainer, their command lines, node config and lifetime.

The node config carries where the institution's records, schema, policy and
state live; the coordinator never sees these paths, only what the ClientApp
releases. ``run_institution`` is what ``fedsilo-client start`` runs once its
checks have passed (the coordinator's side is ``fedsilo.server.processes``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedsilo.client.trainer import SOCKET_KEY, socket_dir, wait_ready
from fedsilo.common.errors import FedsiloError
from fedsilo.runtime.processes import child_env, die_with_parent, flower_env, stop_process

ACTIVATION_ATTEMPTS = 12  # a SuperNode refused at start is retried for about two minutes
ACTIVATION_WINDOW_S = 30.0
ACTIVATION_PAUSE_S = 10


def node_config(*, name: str, data: Path, schema: Path, policy: Path, state_dir: Path) -> dict[str, str]:
    """A deployed institution's node config."""
    return {
        "name": name,
        "data-path": str(data.resolve()),
        "schema-path": str(schema.resolve()),
        "policy-path": str(policy.resolve()),
        "state-dir": str(state_dir.resolve()),
    }


def node_config_arg(values: dict[str, str]) -> str:
    """Flower's ``--node-config`` string (TOML values)."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def trainer_argv(*, socket_path: Path, config: dict[str, str]) -> list[str]:
    """The warm trainer (``fedsilo.client.trainer``) for this node config."""
    return [
        sys.executable,
        "-m",
        "fedsilo.client.trainer",
        "--socket",
        str(socket_path),
        "--node-config",
        json.dumps(config),
    ]


def supernode_argv(
    *, server: str, ca: Path | None, key: Path | None, config: str, host: str = "127.0.0.1", port: int = 9094
) -> list[str]:
    """``flower-supernode`` over TLS (trusting ``ca``) authenticated by ``key``; ``ca=None``: plaintext."""
    argv = [
        sys.executable,
        "-m",
        "fedsilo.runtime.flower.supernode",  # flower-supernode, patched (fedsilo.runtime.flower)
        "--superlink",
        server,
        "--node-config",
        config,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if ca is None:
        return [*argv, "--insecure"]
    argv += ["--root-certificates", str(ca.resolve())]
    return [*argv, "--auth-supernode-private-key", str(key.resolve())] if key is not None else argv


@dataclass(frozen=True)
class Node:
    """What ``run_institution`` starts: one institution's SuperNode (and warm trainer) and where they connect."""

    name: str
    server: str
    ca: Path
    key: Path
    config: dict[str, str]  # ``node_config``
    state_dir: Path
    port: int = 9094
    max_retries: int | None = None  # None: the SuperNode retries forever, and is restarted if refused at once
    warm_trainer: bool = True


def run_institution(node: Node, say: Callable[[str], None]) -> None:
    """Run the warm trainer and the SuperNode until the SuperNode stops or we are interrupted.

    The warm trainer holds torch and the records, so that each round's fit and
    evaluate do not start from a cold process (see ``fedsilo.client.trainer``). ``say``
    reports progress; a failure raises ``FedsiloError``.
    """
    private = socket_dir()
    socket_path = private / "trainer.sock"
    config = node.config
    # Every child is killed when this process ends, even by SIGKILL (the SuperNode's own
    # children watch it in turn): no part of the institution goes on after it stopped.
    trainer = (
        subprocess.Popen(
            trainer_argv(socket_path=socket_path, config=config),
            cwd=node.state_dir,
            env=child_env(),
            preexec_fn=die_with_parent(),
        )
        if node.warm_trainer
        else None
    )
    try:
        if trainer is not None:
            wait_ready(socket_path, trainer)
            config = {**config, SOCKET_KEY: str(socket_path)}
        argv = supernode_argv(
            server=node.server, ca=node.ca, key=node.key, config=node_config_arg(config), port=node.port
        )
        if node.max_retries is not None:
            argv += ["--max-retries", str(node.max_retries)]
        _run_supernode(argv, node, say)
    finally:
        if trainer is not None:
            stop_process(trainer)
        shutil.rmtree(private, ignore_errors=True)


def _run_supernode(argv: list[str], node: Node, say: Callable[[str], None]) -> None:
    """Run the SuperNode until it stops or we are interrupted; retry one the SuperLink refused at once."""
    say(f"{node.name}: SuperNode connecting to {node.server} over TLS; stop with Ctrl-C")
    attempts = 1 if node.max_retries is not None else ACTIVATION_ATTEMPTS
    code = 0
    for attempt in range(attempts):
        started = time.monotonic()
        process = subprocess.Popen(
            argv, env=flower_env(node.state_dir / "flwr"), cwd=node.state_dir, preexec_fn=die_with_parent()
        )
        try:
            code = process.wait()
        except KeyboardInterrupt:
            code = 0
        finally:
            stop_process(process)
        # Right after this node stopped, or after the SuperLink restarted, the SuperLink may
        # still hold the node's previous session and refuse to activate it for a while.
        if code == 0 or time.monotonic() - started > ACTIVATION_WINDOW_S or attempt == attempts - 1:
            break
        say(f"{node.name}: the SuperNode stopped at once (code {code}); trying again in {ACTIVATION_PAUSE_S} s")
        time.sleep(ACTIVATION_PAUSE_S)
    if code:
        raise FedsiloError(f"the SuperNode exited with code {code}")
