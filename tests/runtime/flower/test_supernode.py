"""The SuperNode entry point caps Flower's 3 s poll and runs only fedsilo's ClientApp (Flower's side: the tripwires)."""

import io
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

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
