"""Flower's SuperNode, running only fedsilo's own ClientApp and polling more often than every 3 s.

Three changes to Flower 1.41's ``flower-supernode``, which otherwise runs unchanged
with the same command-line options (``flwr/supernode/start_client_internal.py``):

- **Only the installed fedsilo ClientApp runs.** A SuperNode runs whatever
  ClientApp the Flower app bundle (FAB) of a run names, and the coordinator
  chooses the FAB. Flower's answer, ``--trusted-entities``, accepts only FABs
  signed through Flower Hub, which a private federation does not use. So this
  SuperNode accepts a FAB only if it carries no code at all (``pyproject.toml``
  and Flower's manifest, nothing else) and names ``fedsilo.client.client_app:app`` as
  its ClientApp: the code that touches the records is then the institution's
  own installed fedsilo. Any other FAB gets Flower's own refusal (an
  ``INVALID_FAB`` error reply), through Flower's FAB-verification hook.
  Every field of the FAB that Flower turns into a path (it installs the bundle
  in ``FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>``, from the FAB's
  ``tool.flwr.app.publisher``, ``project.name`` and ``project.version``:
  ``flwr/cli/install.py``) must be one plain path segment: a version
  ``1/../../../escaped``, or a publisher ``/tmp/x``, is refused the same way.
- **Warm ClientApp processes.** The SuperNode starts ``flower-superexec``, which
  starts a fresh ``flwr-clientapp`` process for every message; here it starts
  ``fedsilo.runtime.flower.superexec`` instead (Flower's SuperExec, forking each ClientApp from
  a process that has Flower and fedsilo's ClientApp imported).
- **Polling.** The SuperNode sleeps a fixed 3 s whenever it finds no message
  waiting, and a SecAgg+ round sends every institution five messages one after
  the other. That sleep is capped at ``FEDSILO_SUPERNODE_POLL_S`` seconds (default
  0.5: each poll is a TLS request to the coordinator). The SuperNode's 0.5 s waits
  on its own state (for the ClientApp's reply, for a reply's contents) are capped
  at 0.05 s: they cost no request.

``python -m fedsilo.runtime.flower.supernode`` (what an institution's ``fedsilo-client start`` runs)
calls ``main``. Flower is imported inside functions: the process that runs ``main``
imports it once anyway, and tests and tools can read ``fab_problem`` without it.
"""

from __future__ import annotations

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
from pathlib import Path
from types import ModuleType
from typing import Any

from fedsilo.runtime.flower.polling import cap_polling, poll_seconds
from fedsilo.runtime.processes import scrub_environment

DEFAULT_POLL_S = 0.5
LOCAL_POLL_S = 0.05
CLIENT_APP = "fedsilo.client.client_app:app"
SUPEREXEC = "fedsilo.runtime.flower.superexec"
FAB_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
_PINNED = {"fedsilo": "only FABs without code that name fedsilo's installed ClientApp"}


# A FAB field that becomes part of a directory name: one segment, no "..", no separator.
PATH_FIELD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")
# The FAB's fields Flower joins into its install directory (flwr.common.config.get_metadata_from_config).
PATH_FIELDS = (("tool", "flwr", "app", "publisher"), ("project", "name"), ("project", "version"))


def fab_problem(content: bytes) -> str | None:
    """Why this SuperNode refuses a FAB, or None if it is fedsilo's (no code, fedsilo's ClientApp).

    Besides naming fedsilo's ClientApp, every field Flower turns into a path must
    be one plain directory-name segment (``path_field_problems``).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = set(fab.namelist())
            if extra := sorted(names - FAB_FILES):
                return f"the app bundle carries files of its own ({', '.join(extra[:5])})"
            config = tomllib.loads(fab.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        return f"the app bundle cannot be read: {err}"
    named = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
    if named != CLIENT_APP:
        return f"the app bundle names the ClientApp {named!r}, not {CLIENT_APP!r}"
    return path_field_problems(config)


def path_field_problems(config: dict[str, Any]) -> str | None:
    """The FAB fields (of its ``pyproject.toml``, as ``config``) that cannot name a directory, said; None if all can.

    Flower installs a FAB in ``FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>``
    without checking these fields: a ``/`` or ``..`` in one of them, or an absolute
    publisher, puts the bundle's files anywhere the SuperNode's user can write.
    """
    bad = []
    for keys in PATH_FIELDS:
        value: Any = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, str) or PATH_FIELD.fullmatch(value) is None or ".." in value:
            bad.append(f"{'.'.join(keys)} {value!r}")
    if not bad:
        return None
    return (
        f"the app bundle's {', '.join(bad)} cannot name a directory: Flower installs the app under "
        "FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>; use letters, digits and . _ + - (no '..')"
    )


class _SuperExecLauncher:
    """The ``subprocess`` module, except that ``flower-superexec`` becomes ``fedsilo.runtime.flower.superexec``."""

    def Popen(self, args: list[str], *rest: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        if args and args[0] == "flower-superexec":
            args = [sys.executable, "-m", SUPEREXEC, *args[1:]]
        return subprocess.Popen(args, *rest, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def warm_clientapps(module: ModuleType) -> None:
    """Make Flower's SuperNode (``module``) start fedsilo's forking SuperExec instead of Flower's."""
    if getattr(module, "subprocess", None) is not subprocess or '["flower-superexec"]' not in _source(module):
        raise RuntimeError(f"{module.__name__} no longer starts flower-superexec as expected; review this patch")
    module.subprocess = _SuperExecLauncher()  # type: ignore[attr-defined]


def _source(module: ModuleType) -> str:
    return Path(str(module.__file__)).read_text(encoding="utf-8")


def pin_client_app(module: ModuleType) -> None:
    """Make Flower's SuperNode loop (``module``) refuse every FAB but fedsilo's, with its own error reply."""
    pull, verify = getattr(module, "_pull_and_store_message", None), getattr(module, "_verify_fab", None)
    if pull is None or verify is None or getattr(pull, "__wrapped__", None) is not None:
        raise RuntimeError(f"{module.__name__} no longer has the FAB-verification hook as expected; review this patch")

    def checked_get_fab(get_fab: Callable[[str, int], Any]) -> Callable[[str, int], Any]:
        def get(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            # Flower checks this flag before calling the verification hook below.
            return replace(fab, verifications={**fab.verifications, "valid_license": "checked by fedsilo"})

        return get

    def pull_and_store_message(*, get_fab: Callable[[str, int], Any], trusted_entities: Any, **kwargs: Any) -> Any:
        return pull(get_fab=checked_get_fab(get_fab), trusted_entities=_PINNED, **kwargs)

    def verify_fab(fab: Any, trusted_entities: dict[str, str]) -> bool:
        problem = fab_problem(fab.content)
        if problem is not None:
            from flwr.common import log

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
