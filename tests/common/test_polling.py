"""The ServerApp's wait for replies is capped, and a Flower upgrade that moves it is noticed."""

import time
from pathlib import Path

import flwr.superlink.grid.http_grid as http_grid
import pytest

from common.polling import CappedSleep, cap_grid_polling, poll_seconds


def test_the_serverapps_reply_poll_is_capped_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    source = Path(http_grid.__file__).read_text()
    assert "def send_and_receive" in source and "time.sleep(3)" in source  # what the cap shortens
    monkeypatch.setattr(http_grid, "time", time)
    cap_grid_polling()
    assert isinstance(http_grid.time, CappedSleep) and http_grid.time.cap == 0.2
    cap_grid_polling()  # a second ServerApp in the same process: no stacking, no error
    started = time.monotonic()
    http_grid.time.sleep(3)
    assert time.monotonic() - started < 1


def test_poll_intervals_from_the_environment_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSILO_SERVERAPP_POLL_S", "0.5")
    assert poll_seconds("FEDSILO_SERVERAPP_POLL_S", 0.2) == 0.5
    for bad in ("0", "ten", "5"):
        monkeypatch.setenv("FEDSILO_SERVERAPP_POLL_S", bad)
        with pytest.raises(SystemExit, match=r"in \[0.05, 3\]"):
            poll_seconds("FEDSILO_SERVERAPP_POLL_S", 0.2)
