"""The SuperNode entry point caps Flower's 3 s poll, and notices if Flower changes under it."""

import time
import types
from pathlib import Path

import flwr.supernode.start_client_internal as internal
import pytest

from client.supernode import cap_polling


def test_flowers_supernode_still_sleeps_through_the_time_module() -> None:
    assert internal.time is time  # what cap_polling replaces; a Flower upgrade that changes it fails here
    assert "time.sleep(3)" in Path(internal.__file__).read_text()


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
