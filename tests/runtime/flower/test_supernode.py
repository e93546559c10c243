"""The SuperNode entry point caps Flower's 3 s poll and runs only fedsilo's ClientApp (Flower's side: the tripwires)."""

import hashlib
import io
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path
from typing import Any
from unittest import mock

import flwr.supernode.start_client_internal as internal
import pytest

from fedsilo.runtime.flower.polling import cap_polling
from fedsilo.runtime.flower.supernode import CLIENT_APP, fab_problem, pin_client_app, warm_clientapps
from fedsilo.server.federation import Federation


def test_short_waits_have_their_own_cap() -> None:
    module = types.ModuleType("fake")
    module.time = time  # type: ignore[attr-defined]
    cap_polling(module, 0.5, short_cap=0.01)
    started = time.monotonic()
    for _ in range(20):
        module.time.sleep(0.5)  # type: ignore[attr-defined]
    assert time.monotonic() - started < 2  # 20 x 0.01 s, not 20 x 0.5 s
    assert module.time.cap == 0.5 and module.time.short_cap == 0.01  # type: ignore[attr-defined]


def test_capped_sleeps_are_short_and_the_rest_of_time_is_untouched() -> None:
    module = types.ModuleType("fake")
    module.time = time  # type: ignore[attr-defined]
    cap_polling(module, 0.01)
    started = time.monotonic()
    module.time.sleep(3)  # type: ignore[attr-defined]
    assert time.monotonic() - started < 1
    assert module.time.monotonic is time.monotonic  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="no longer uses the time module"):
        cap_polling(module, 0.01)  # already patched: refuse to stack


def fab(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def fedsilo_pyproject(tmp_path: Path) -> str:
    fed = Federation.init(tmp_path / "fed", dataset="german-credit")
    return (fed.write_app() / "pyproject.toml").read_text()


def test_the_fab_fedsilo_server_submits_is_accepted(tmp_path: Path) -> None:
    pyproject = fedsilo_pyproject(tmp_path)
    assert fab_problem(fab({"pyproject.toml": pyproject, ".info/CONTENT": "x"})) is None


def test_a_fab_with_code_or_another_clientapp_is_refused(tmp_path: Path) -> None:
    pyproject = fedsilo_pyproject(tmp_path)
    # Code in the bundle could shadow the installed package (the FAB folder comes first on sys.path).
    shadow = fab({"pyproject.toml": pyproject, "client/client_app.py": "app = None"})
    assert "files of its own (client/client_app.py)" in str(fab_problem(shadow))
    other = fab({"pyproject.toml": pyproject.replace(CLIENT_APP, "evil:app")})
    assert "names the ClientApp 'evil:app'" in str(fab_problem(other))
    assert "cannot be read" in str(fab_problem(b"not a zip"))


def test_the_pin_wraps_flowers_hook_once() -> None:
    module = types.ModuleType("fake")
    module._pull_and_store_message = internal._pull_and_store_message  # type: ignore[attr-defined]
    module._verify_fab = internal._verify_fab  # type: ignore[attr-defined]
    pin_client_app(module)
    with pytest.raises(RuntimeError, match="review this patch"):
        pin_client_app(module)  # already pinned: refuse to stack


def test_the_supernode_starts_fedsilos_superexec_which_is_flowers_own_with_a_warm_launcher() -> None:
    module = types.ModuleType("fake")
    module.__file__ = internal.__file__
    module.subprocess = subprocess  # type: ignore[attr-defined]
    warm_clientapps(module)
    # What the SuperNode runs as `flower-superexec ...`: Flower's SuperExec command line,
    # via fedsilo.runtime.flower.superexec.
    launched = module.subprocess.Popen(  # type: ignore[attr-defined]
        ["flower-superexec", "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = launched.communicate(timeout=120)
    assert launched.returncode == 0 and b"Run Flower SuperExec" in out
    assert module.subprocess.DEVNULL is subprocess.DEVNULL  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="review this patch"):
        warm_clientapps(module)  # already patched: refuse to stack


def test_the_institutions_supernode_command_runs_flowers_supernode() -> None:
    # `fedsilo-client start` runs `python -m fedsilo.runtime.flower.supernode ...` (client/processes.py).
    shown = subprocess.run(
        [sys.executable, "-m", "fedsilo.runtime.flower.supernode", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert shown.returncode == 0 and "--superlink" in shown.stdout


# Issue 13, attack 8: an app bundle whose fields Flower turns into a path leave FLWR_HOME/apps.


def installable_fab(pyproject: str) -> bytes:
    """A FAB as Flower builds it: pyproject.toml and the .info/CONTENT manifest of its hashes."""
    digest = hashlib.sha256(pyproject.encode()).hexdigest()
    return fab({"pyproject.toml": pyproject, ".info/CONTENT": f"pyproject.toml,{digest},{len(pyproject)}\n"})


ESCAPE = ('version = "1.0.0"', 'version = "1/../../../escaped"')
ESCAPES = [
    ESCAPE,
    ('version = "1.0.0"', 'version = ".."'),
    ('name = "fedsilo-federation"', 'name = "../../escaped"'),
    ('publisher = "fedsilo"', 'publisher = "/tmp/escaped"'),
    ('publisher = "fedsilo"', "publisher = 7"),
]


@pytest.mark.parametrize("field,escape", ESCAPES)
def test_a_fab_whose_fields_leave_the_apps_directory_is_refused(tmp_path: Path, field: str, escape: str) -> None:
    pyproject = fedsilo_pyproject(tmp_path)
    assert field in pyproject
    problem = fab_problem(installable_fab(pyproject.replace(field, escape)))
    assert problem is not None and "cannot name a directory" in problem


def test_flower_would_write_such_a_fab_outside_its_apps_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.cli.install import install_from_fab

    # The attack, against Flower itself: what fab_problem stands in front of.
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home" / "flwr"))
    pyproject = fedsilo_pyproject(tmp_path).replace(*ESCAPE)
    installed = install_from_fab(installable_fab(pyproject), skip_prompt=True)
    assert installed.resolve().parent == tmp_path / "home"  # FLWR_HOME/apps/fedsilo.fedsilo-federation.1/../../..
    assert (installed / "pyproject.toml").is_file()


def pinned_pull(monkeypatch: pytest.MonkeyPatch, content: bytes) -> list[Any]:
    """One message of a run of ``content`` through Flower's own SuperNode loop, pinned; the error replies it made."""
    from dataclasses import replace

    from flwr.app import Message, RecordDict
    from flwr.app.metadata import Metadata
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run

    fab_hash = hashlib.sha256(content).hexdigest()
    # The run names the bundle by the bundle's own fields, as `flwr run` does.
    publisher, name, version = "fedsilo", "fedsilo-federation", "1.0.0"
    text = zipfile.ZipFile(io.BytesIO(content)).read("pyproject.toml").decode()
    if ESCAPE[1] in text:
        version = "1/../../../escaped"
    run = replace(Run.create_empty(7), fab_id=f"{publisher}/{name}", fab_version=version, fab_hash=fab_hash)
    monkeypatch.setattr(internal, "_pull_and_store_message", internal._pull_and_store_message)
    monkeypatch.setattr(internal, "_verify_fab", internal._verify_fab)
    replies: list[Any] = []
    monkeypatch.setattr(internal, "_insert_message", lambda msg, state, store: replies.append(msg))
    pin_client_app(internal)
    metadata = Metadata(
        run_id=run.run_id,
        message_id="m1",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    message = Message(metadata=metadata, content=RecordDict())
    state = mock.MagicMock()
    state.get_run.return_value = None
    internal._pull_and_store_message(
        state=state,
        object_store=mock.MagicMock(),
        node_config={},
        receive=lambda: (message, mock.MagicMock()),
        get_run=lambda run_id: run,
        get_fab=lambda fab_hash, run_id: Fab(hashlib.sha256(content).hexdigest(), content, {}),
        pull_object=mock.MagicMock(),
        confirm_message_received=mock.MagicMock(),
        trusted_entities=None,
    )
    return [reply for reply in replies if reply.has_error()]


def test_the_pinned_supernode_refuses_a_fab_whose_version_leaves_the_apps_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.common.constant import ErrorCode

    # Prepare: fedsilo's own bundle, its version turned into a path out of FLWR_HOME/apps.
    pyproject = fedsilo_pyproject(tmp_path)
    escaping = installable_fab(pyproject.replace(*ESCAPE))
    # Execute: a message of a run of that bundle reaches Flower's SuperNode loop, pinned.
    refused = pinned_pull(monkeypatch, escaping)
    # Assert: Flower's own refusal goes back, and no task is made for a ClientApp to install the bundle.
    assert [reply.error.code for reply in refused] == [ErrorCode.INVALID_FAB]
    monkeypatch.undo()
    assert pinned_pull(monkeypatch, installable_fab(pyproject)) == []  # the honest bundle passes
