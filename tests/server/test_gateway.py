"""The Fleet gateway's allow-list (the gateway itself runs in tests/server/test_deployment.py)."""

from __future__ import annotations

import pytest

from fedsilo.server.gateway import allowed


@pytest.mark.parametrize(
    "method,path",
    [("POST", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/register-node"), ("GET", "/health")],
)
def test_fleet_calls_and_the_health_check_pass(method: str, path: str) -> None:
    assert allowed(method, path)


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/runtime/pull-messages"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/health"),
        ("GET", "/v1/fleet/pull-messages"),
        ("POST", "/v1/fleet/../control/start-run"),
        ("POST", "/v1/fleet/pull-messages/../../control/start-run"),
        ("POST", "/v1/fleet/%2e%2e/control"),
        ("POST", "/v1/fleet/"),
        ("POST", "/v1/fleetx/pull-messages"),
        ("POST", "//v1/fleet/pull-messages"),
    ],
)
def test_everything_else_is_refused(method: str, path: str) -> None:
    assert not allowed(method, path)
