"""Flower's SuperNode, running only fedsilo's own ClientApp and polling more often than every 3 s.

Two changes to Flower 1.41's ``flower-supernode``, which otherwise runs unchanged
with the same command-line options (``flwr/supernode/start_client_internal.py``):

- **Only the installed fedsilo ClientApp runs.** A SuperNode runs whatever
  ClientApp the Flower app bundle (FAB) of a run names, and the coordinator
  chooses the FAB. Flower's answer, ``--trusted-entities``, accepts only FABs
  signed through Flower Hub, which a private federation does not use. So this
  SuperNode accepts a FAB only if it carries no code at all (``pyproject.toml``
  and Flower's manifest, nothing else) and names ``client.client_app:app`` as
  its ClientApp: the code that touches the records is then the institution's
  own installed fedsilo. Any other FAB gets Flower's own refusal (an
  ``INVALID_FAB`` error reply), through Flower's FAB-verification hook.
  Every field Flower turns into a path (``FLWR_HOME/apps/<publisher>.<name>.
  <version>.<hash>``: the FAB's publisher, project name and version, and the
  run's own ``fab_id``, ``fab_version`` and ``fab_hash``, which Flower uses to
  find the installed app) must be one plain path segment, and the run's fields
  must be the FAB's own: a version ``1/../../../escaped`` is refused.
- **Warm ClientApp processes.** The SuperNode starts ``flower-superexec``, which
  starts a fresh ``flwr-clientapp`` process for every message; here it starts
  ``client.superexec`` instead (Flower's SuperExec, forking each ClientApp from
  a process that has Flower and fedsilo's ClientApp imported).
- **Polling.** The SuperNode sleeps a fixed 3 s whenever it finds no message
  waiting, and a SecAgg+ round sends every institution five messages one after
  the other. That sleep is capped at ``FEDSILO_SUPERNODE_POLL_S`` seconds (default
  0.5: each poll is a TLS request to the coordinator). The SuperNode's 0.5 s waits
  on its own state (for the ClientApp's reply, for a reply's contents) are capped
  at 0.05 s: they cost no request.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable
from dataclasses import replace
from types import ModuleType
from typing import Any

from common.flower_env import scrub_environment
from common.polling import cap_polling, poll_seconds

DEFAULT_POLL_S = 0.5
LOCAL_POLL_S = 0.05
CLIENT_APP = "client.client_app:app"
FAB_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
_PINNED = {"fedsilo": "only FABs without code that name fedsilo's installed ClientApp"}
_PROBLEM = "fedsilo-refusal"  # set by the pinned SuperNode loop on every FAB it fetches


# A field that becomes part of a directory name: one segment, no "..", no separator.
PATH_FIELD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")
FAB_HASH = re.compile(r"[0-9a-f]{64}")


def fab_problem(content: bytes, run: Any = None) -> str | None:
    """Why this SuperNode refuses a FAB, or None if it is fedsilo's (no code, fedsilo's ClientApp).

    ``run``: the run (Flower's ``Run``) that names the FAB; its ``fab_id``,
    ``fab_version`` and ``fab_hash`` must then be the FAB's own.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = set(fab.namelist())
            if extra := sorted(names - FAB_FILES):
                return f"the app bundle carries files of its own ({', '.join(extra[:5])})"
            config = tomllib.loads(fab.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        return f"the app bundle cannot be read: {err}"
    app = config.get("tool", {}).get("flwr", {}).get("app", {})
    named = app.get("components", {}).get("clientapp") if isinstance(app, dict) else None
    if named != CLIENT_APP:
        return f"the app bundle names the ClientApp {named!r}, not {CLIENT_APP!r}"
    project = config.get("project", {})
    fields = {
        "tool.flwr.app.publisher": app.get("publisher"),
        "project.name": project.get("name") if isinstance(project, dict) else None,
        "project.version": project.get("version") if isinstance(project, dict) else None,
    }
    if bad := _path_field_problems(fields):
        return f"the app bundle's {bad}"
    if run is None:
        return None
    fab_id = f"{fields['tool.flwr.app.publisher']}/{fields['project.name']}"
    claimed = {"fab_id": run.fab_id, "fab_version": run.fab_version, "fab_hash": run.fab_hash}
    own = {"fab_id": fab_id, "fab_version": fields["project.version"], "fab_hash": hashlib.sha256(content).hexdigest()}
    if differ := [f"{key} {claimed[key]!r} (the bundle's: {own[key]!r})" for key in own if claimed[key] != own[key]]:
        return f"the run names the app bundle by {', '.join(differ)}"
    return None


def _path_field_problems(fields: dict[str, Any]) -> str | None:
    """The fields that cannot be one plain segment of a directory name, said; None if all can."""
    bad = [
        f"{key} {value!r}"
        for key, value in fields.items()
        if not isinstance(value, str) or PATH_FIELD.fullmatch(value) is None or ".." in value
    ]
    if not bad:
        return None
    return (
        f"{', '.join(bad)} cannot name a directory: Flower installs the app under "
        "FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>; use letters, digits and . _ + - (no '..')"
    )


class _SuperExecLauncher:
    """The ``subprocess`` module, except that ``flower-superexec`` becomes ``client.superexec``."""

    def Popen(self, args: list[str], *rest: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        if args and args[0] == "flower-superexec":
            args = [sys.executable, "-m", "client.superexec", *args[1:]]
        return subprocess.Popen(args, *rest, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def warm_clientapps(module: ModuleType) -> None:
    """Make Flower's SuperNode (``module``) start fedsilo's forking SuperExec instead of Flower's."""
    if getattr(module, "subprocess", None) is not subprocess or '["flower-superexec"]' not in _source(module):
        raise RuntimeError(f"{module.__name__} no longer starts flower-superexec as expected; review this patch")
    module.subprocess = _SuperExecLauncher()  # type: ignore[attr-defined]


def _source(module: ModuleType) -> str:
    from pathlib import Path

    return Path(str(module.__file__)).read_text(encoding="utf-8")


def pin_client_app(module: ModuleType) -> None:
    """Make Flower's SuperNode loop (``module``) refuse every FAB but fedsilo's, with its own error reply."""
    pull, verify = getattr(module, "_pull_and_store_message", None), getattr(module, "_verify_fab", None)
    if pull is None or verify is None or getattr(pull, "__wrapped__", None) is not None:
        raise RuntimeError(f"{module.__name__} no longer has the FAB-verification hook as expected; review this patch")

    def pull_and_store_message(
        *, get_run: Callable[[int], Any], get_fab: Callable[[str, int], Any], trusted_entities: Any, **kwargs: Any
    ) -> Any:
        runs: dict[int, Any] = {}  # what the SuperLink said of each run, to check against its FAB

        def checked_get_run(run_id: int) -> Any:
            runs[run_id] = run = get_run(run_id)
            return run

        def checked_get_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            # Flower checks this flag before calling the verification hook below, which gets only
            # the FAB: the run that names it travels along in the FAB's verifications.
            problem = fab_problem(fab.content, runs.get(run_id)) or ""
            checked = {"valid_license": "checked by fedsilo", _PROBLEM: problem}
            return replace(fab, verifications={**fab.verifications, **checked})

        return pull(get_run=checked_get_run, get_fab=checked_get_fab, trusted_entities=_PINNED, **kwargs)

    def verify_fab(fab: Any, trusted_entities: dict[str, str]) -> bool:
        # The content is checked here whatever the FAB says of itself; the run's check adds to it.
        problem = fab_problem(fab.content) or fab.verifications.get(_PROBLEM) or None
        if problem is not None:
            from flwr.common.logger import log

            log(logging.ERROR, "fedsilo refused a run's app: %s", problem)
        return problem is None

    pull_and_store_message.__wrapped__ = pull  # type: ignore[attr-defined]
    module._pull_and_store_message = pull_and_store_message  # type: ignore[attr-defined]
    module._verify_fab = verify_fab  # type: ignore[attr-defined]


def main() -> None:
    """``flower-supernode`` with capped polling, running only fedsilo's ClientApp."""
    scrub_environment()  # Flower's internal switches, should this process have been started with them
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    cap_polling(internal, poll_seconds("FEDSILO_SUPERNODE_POLL_S", DEFAULT_POLL_S), short_cap=LOCAL_POLL_S)
    pin_client_app(internal)
    if os.environ.get("FEDSILO_FORKING_CLIENTAPPS", "1") != "0":
        warm_clientapps(internal)
    flower_supernode()


if __name__ == "__main__":
    main()
