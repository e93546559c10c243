"""An institution's processes: its SuperNode and warm trainer, their command lines and node config.

The node config carries where the institution's records, schema, policy and
state live; the coordinator never sees these paths, only what the ClientApp
releases.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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
    """The warm trainer (``client.trainer``) for this node config."""
    return [sys.executable, "-m", "client.trainer", "--socket", str(socket_path), "--node-config", json.dumps(config)]


def supernode_argv(
    *, server: str, ca: Path | None, key: Path | None, config: str, host: str = "127.0.0.1", port: int = 9094
) -> list[str]:
    """``flower-supernode`` over TLS (trusting ``ca``) authenticated by ``key``; ``ca=None``: plaintext."""
    argv = [
        sys.executable,
        "-m",
        "client.supernode",  # flower-supernode, polling more often
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
