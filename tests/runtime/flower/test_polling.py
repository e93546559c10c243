"""The ServerApp's wait for replies is capped (that Flower still waits there: the tripwires)."""

import time

import flwr.superlink.grid.http_grid as http_grid
import pytest

from fedsilo.runtime.flower.polling import CappedSleep, cap_grid_polling, poll_seconds


def test_the_serverapps_reply_poll_is_capped_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
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
