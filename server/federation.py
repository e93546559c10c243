"""A coordinator's federation directory: certificates, settings, schema, admitted institutions.

Layout (everything Flower writes stays inside it)::

    DIR/federation.toml     where the SuperLink listens and the run settings
    DIR/schema.toml         the federation schema every institution receives
    DIR/certs/              ca.crt (send to institutions), ca.key, server.crt, server.key
    DIR/institutions.toml   admitted institutions: name, public key, fingerprint
    DIR/app/pyproject.toml  the Flower app ``fedsilo-server run`` submits
    DIR/flwr/               FLWR_HOME of the coordinator's Flower processes
    DIR/superlink/          the SuperLink's state database and log
    DIR/runs/               one run directory per run
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedsilo.common.accounting import REPLACE_ONE
from fedsilo.common.datasets import builtin_schema_path
from fedsilo.common.errors import ConfigError
from fedsilo.common.schema import Schema
from fedsilo.common.settings import Proposal, RunSettings, check_keys
from fedsilo.common.tomlfile import read_toml, toml_value
from fedsilo.runtime.keys import DEFAULT_HOSTS, fingerprint, issue_server_certificates, load_node_public_key
from fedsilo.server.run_naming import new_run_dir

DEFAULT_PORT = 9092


def deployed_proposal() -> Proposal:
    """What a new federation's runs propose unless federation.toml says otherwise (``fedsilo-server init``).

    fedsilo's defaults, with the noise calibrated for replace-one neighbours (in a deployment
    each institution's record count is public) and ``secure-evaluation = true`` (a deployed
    coordinator sees no clear scores by default, so it gets the private federation-wide
    estimate instead). Simulations keep add-remove and no secure evaluation, so their figures
    stay comparable with published ones.
    """
    defaults = Proposal(secure_evaluation=True)
    return replace(defaults, privacy=replace(defaults.privacy, neighbouring=REPLACE_ONE))


@dataclass(frozen=True)
class FederationConfig:
    """federation.toml, parsed: where the SuperLink listens and what runs propose by default."""

    hosts: tuple[str, ...]
    port: int
    proposal: Proposal  # its [run] table: proposal keys only, the coordinator's paths are chosen here


@dataclass(frozen=True)
class Institution:
    """An admitted institution."""

    name: str
    public_key: str
    fingerprint: str
    admitted_at: str


class Federation:
    """Reads and writes one federation directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    # paths
    @property
    def config_path(self) -> Path:
        return self.root / "federation.toml"

    @property
    def schema_path(self) -> Path:
        return self.root / "schema.toml"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def ca_cert(self) -> Path:
        return self.certs / "ca.crt"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def app_dir(self) -> Path:
        return self.root / "app"

    @property
    def superlink_dir(self) -> Path:
        return self.root / "superlink"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def registry_path(self) -> Path:
        return self.root / "institutions.toml"

    @classmethod
    def init(
        cls,
        root: Path,
        *,
        hosts: tuple[str, ...] = DEFAULT_HOSTS,
        dataset: str = "breast-cancer",
        schema: Path | None = None,
        port: int = DEFAULT_PORT,
        proposal: Proposal | None = None,
    ) -> Federation:
        """Create a federation directory; refuse to touch an existing one.

        ``proposal`` (default: ``deployed_proposal``, the deployed coordinator's defaults)
        becomes federation.toml's ``[run]``, with ``dataset``.
        """
        fed = cls(root)
        if fed.config_path.exists():
            raise ConfigError(f"{fed.config_path} exists: {root} already holds a federation")
        for existing in ("ca.key", "ca.crt", "server.key", "server.crt"):
            if (fed.certs / existing).exists():
                raise ConfigError(f"{fed.certs / existing} exists; use an empty directory for a new federation")
        if not 0 < port < 65536:
            raise ConfigError(f"--port must be in 1..65535. Found {port}.")
        for host in hosts:
            if not host or any(c.isspace() for c in host) or not host.isascii():
                raise ConfigError(f"--host {host!r}: give a DNS name (ASCII) or an IP address")
        # This machine's own tools (start's health check, run, status) connect over loopback.
        hosts = tuple(dict.fromkeys((*hosts, *DEFAULT_HOSTS)))
        source = schema if schema is not None else builtin_schema_path(dataset)
        Schema.load(source)  # a malformed schema fails here, before anything is written
        run = proposal or deployed_proposal()
        run = replace(run, data=replace(run.data, dataset=dataset))
        # Everything is written in a scratch folder beside DIR and moved in at the end, so a
        # failure part-way leaves no DIR, or DIR as it was.
        fed.root.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{fed.root.name}.init-", dir=fed.root.parent))
        try:
            cls._write_new(cls(scratch), source, hosts, port, run)
            if not fed.root.exists():
                scratch.rename(fed.root)
            else:
                for entry in sorted(scratch.iterdir()):
                    entry.rename(fed.root / entry.name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return fed

    @staticmethod
    def _write_new(fed: Federation, source: Path, hosts: tuple[str, ...], port: int, run: Proposal) -> None:
        issue_server_certificates(fed.certs, hosts)
        shutil.copyfile(source, fed.schema_path)
        lines = [
            "# fedsilo federation: written by `fedsilo-server init`, edit [run] to change the defaults of runs.",
            "[federation]",
            f"hosts = {json.dumps(list(hosts))}",
            f"port = {port}",
            "",
            "# Run settings: the keys of [tool.flwr.app.config] in fedsilo's pyproject.toml.",
            "[run]",
            *(f"{key} = {toml_value(value)}" for key, value in run.to_config().items()),
            "",
        ]
        fed.config_path.write_text("\n".join(lines), encoding="utf-8")
        fed.registry_path.write_text("# institutions admitted with `fedsilo-server admit`\n", encoding="utf-8")

    def load(self) -> FederationConfig:
        """federation.toml, read and checked once: every [run] key a proposal's, every value valid."""
        if not self.config_path.exists():
            raise ConfigError(f"{self.root} is not a federation directory (run `fedsilo-server init` first)")
        raw = read_toml(self.config_path, "federation file")
        section = raw.get("federation", {})
        proposal = Proposal.from_config(raw.get("run", {}), source=f"{self.config_path}: [run]")
        return FederationConfig(
            tuple(section.get("hosts", DEFAULT_HOSTS)), int(section.get("port", DEFAULT_PORT)), proposal
        )

    def settings(self, proposal: Proposal | None = None, **local: str) -> RunSettings:
        """A run's settings: ``proposal`` (default: federation.toml's), this federation's schema, ``local`` paths."""
        return RunSettings.of(proposal or self.load().proposal, schema_path=str(self.schema_path), **local)

    def new_run(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        rounds: int | None = None,
        epsilon: float | None = None,
        min_institutions: int | None = None,
    ) -> RunSettings:
        """A new run's settings: federation.toml's [run], then ``config`` (run-config keys), then the options.

        Every round waits for ``min_institutions`` (default: every admitted institution,
        unless ``config`` says otherwise). The run gets a fresh directory under ``runs/``.
        """
        config = dict(config or {})
        check_keys(config, Proposal, source="--config")
        base = self.load().proposal
        proposal = Proposal.from_config({**base.to_config(), **config}, source="--config")
        if rounds is not None:
            proposal = replace(proposal, rounds=rounds)
        if epsilon is not None:
            proposal = replace(proposal, privacy=replace(proposal.privacy, target_epsilon=epsilon))
        if min_institutions is None and "min-institutions" not in config:
            min_institutions = len(self.institutions())
        if min_institutions:
            proposal = replace(proposal, min_institutions=min_institutions)
        return self.settings(proposal, out_dir=str(new_run_dir(self.runs_dir)))

    def resumed_run(self) -> RunSettings:
        """The settings that continue the last unfinished run (the ServerApp takes the rest from its directory)."""
        candidates = [p for p in sorted(self.runs_dir.glob("*")) if (p / "progress.json").exists()]
        if not candidates or (candidates[-1] / "report.json").exists():
            raise ConfigError(f"no unfinished run under {self.runs_dir} has a completed round to resume from")
        return self.settings(resume_from=str(candidates[-1]))

    def runs(self) -> list[tuple[str, int, str]]:
        """Each run directory's name, rounds written and state (finished, or stopped or running)."""
        out = []
        for path in sorted(self.runs_dir.glob("*")) if self.runs_dir.exists() else []:
            state = "finished" if (path / "report.json").exists() else "stopped or running"
            metrics = path / "metrics.csv"
            rows = max(0, len(metrics.read_text().splitlines()) - 1) if metrics.exists() else 0
            out.append((path.name, rows, state))
        return out

    @property
    def port(self) -> int:
        return self.load().port

    # institutions
    def institutions(self) -> dict[str, Institution]:
        if not self.registry_path.exists():
            return {}
        raw = read_toml(self.registry_path, "institutions file")
        return {name: Institution(name=name, **entry) for name, entry in raw.get("institutions", {}).items()}

    def admit(self, public_key_path: Path, name: str) -> Institution:
        """Record an institution's node public key under ``name``."""
        self.load()
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"institution name {name!r}: use letters, digits, '-', '_' or '.'")
        key = load_node_public_key(public_key_path).decode()
        known = self.institutions()
        if name in known:
            raise ConfigError(f"{name} is already admitted (key {known[name].fingerprint})")
        for other in known.values():
            if other.public_key.split()[:2] == key.split()[:2]:
                raise ConfigError(f"{public_key_path}: this key is already admitted as {other.name}")
        entry = Institution(name, key, fingerprint(key.encode()), datetime.now(UTC).isoformat(timespec="seconds"))
        self._write_registry([*known.values(), entry])
        return entry

    def withdraw(self, name: str) -> None:
        """Undo an admission (when registering it with the running SuperLink failed)."""
        self._write_registry([inst for inst in self.institutions().values() if inst.name != name])

    def _write_registry(self, institutions: list[Institution]) -> None:
        """institutions.toml, replaced in one step."""
        lines = ["# institutions admitted with `fedsilo-server admit`"]
        for inst in institutions:
            lines += [
                "",
                f"[institutions.{json.dumps(inst.name)}]",
                f"public_key = {json.dumps(inst.public_key)}",
                f"fingerprint = {json.dumps(inst.fingerprint)}",
                f"admitted_at = {json.dumps(inst.admitted_at)}",
            ]
        partial = self.registry_path.with_suffix(".toml.partial")
        partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(partial, self.registry_path)

    # the Flower app and connection
    def write_app(self, settings: RunSettings | None = None) -> Path:
        """The Flower app ``flwr run`` submits: fedsilo's components and the run's settings, flattened once.

        ``settings`` default to this federation's; the ServerApp parses them once from its run config.
        """
        settings = settings or self.settings()
        config = "\n".join(f"{k} = {toml_value(v)}" for k, v in settings.to_config().items())
        self.app_dir.mkdir(parents=True, exist_ok=True)
        (self.app_dir / "pyproject.toml").write_text(
            "# Written by fedsilo-server: the installed fedsilo package provides the code.\n"
            '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
            '[project]\nname = "fedsilo-federation"\nversion = "1.0.0"\n'
            'description = "A fedsilo federation"\nlicense = "Apache-2.0"\ndependencies = []\n\n'
            '[tool.flwr.app]\npublisher = "fedsilo"\n\n'
            '[tool.flwr.app.components]\nserverapp = "fedsilo.server.server_app:app"\n'
            'clientapp = "fedsilo.client.client_app:app"\n\n'
            f"[tool.flwr.app.config]\n{config}\n",
            encoding="utf-8",
        )
        return self.app_dir

    def write_connection(self, address: str, *, insecure: bool = False) -> None:
        """The coordinator's Flower CLI connection ``fedsilo`` (in this directory's FLWR_HOME)."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        tls = "insecure = true\n" if insecure else f"root-certificates = {json.dumps(str(self.ca_cert))}\n"
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedsilo"\n\n[superlink.fedsilo]\naddress = {json.dumps(address)}\n{tls}',
            encoding="utf-8",
        )
