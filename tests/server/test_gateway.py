"""The Fleet gateway: its allow-list, and its limits over a real socket (issue 13, attack 7).

The whole gateway, with TLS, also runs in tests/server/test_deployment.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import pytest
import uvicorn

from fedsilo.runtime.processes import free_port
from fedsilo.server.gateway import Limits, allowed, server_config


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


class Upstream(http.server.BaseHTTPRequestHandler):
    """A stand-in SuperLink: answers a Fleet call with the size of what it received."""

    received: ClassVar[list[int]] = []
    release: ClassVar[threading.Event] = threading.Event()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        Upstream.received.append(len(body))
        if self.path.endswith("/wait"):
            Upstream.release.wait(10)
        self._answer(f"got {len(body)}".encode())

    def do_GET(self) -> None:
        self._answer(b"ok")

    def _answer(self, text: bytes) -> None:
        self.send_response(200)
        self.send_header("content-length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, *args: Any) -> None:
        pass


LIMITS = Limits(max_body=1024, max_requests=2, header_timeout=1.0, body_timeout=1.0, request_timeout=5.0)


@pytest.fixture
def gateway() -> Iterator[str]:
    """A real gateway on a loopback port, in front of a stand-in SuperLink, with small limits."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    Upstream.received.clear()
    Upstream.release.clear()
    port = free_port()
    server = uvicorn.Server(
        server_config(f"127.0.0.1:{upstream.server_port}", None, host="127.0.0.1", port=port, limits=LIMITS)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        Upstream.release.set()
        server.should_exit = True
        thread.join(10)
        upstream.shutdown()
        upstream.server_close()


def connect(address: str) -> socket.socket:
    host, port = address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def reply_of(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (or 10 s pass)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_normal_requests_still_pass(gateway: str) -> None:
    body = b"x" * LIMITS.max_body  # exactly at the limit
    done = httpx.post(f"http://{gateway}/v1/fleet/pull-messages", content=body, timeout=10)
    assert done.status_code == 200 and done.text == f"got {len(body)}"
    assert httpx.get(f"http://{gateway}/health", timeout=10).text == "ok"
    assert httpx.post(f"http://{gateway}/v1/control/start-run", timeout=10).status_code == 404


def test_an_oversized_body_gets_413_before_it_is_sent(gateway: str) -> None:
    # Prepare: headers announcing 1 GB, and no byte of the body.
    with connect(gateway) as sock:
        sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        # Execute / Assert: the refusal comes without waiting for the body, and the connection closes.
        assert reply_of(sock).startswith(b"HTTP/1.1 413")
    assert Upstream.received == []


def test_an_oversized_chunked_body_gets_413_once_it_passes_the_limit(gateway: str) -> None:
    chunk = b"800\r\n" + b"y" * 0x800 + b"\r\n"  # 2 KiB, over the 1 KiB limit, no Content-Length
    with connect(gateway) as sock:
        sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
        assert reply_of(sock).startswith(b"HTTP/1.1 413")
    assert Upstream.received == []


def test_a_slow_body_is_cut_off(gateway: str) -> None:
    with connect(gateway) as sock:
        sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the gateway may close while we still send
            for _ in range(20):  # one byte every 0.25 s: 5 s for the whole body
                sock.sendall(b"z")
                time.sleep(0.25)
                if select.select([sock], [], [], 0)[0]:
                    break
        reply = reply_of(sock)
    assert reply.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < LIMITS.body_timeout + 2
    assert Upstream.received == []


def test_slow_headers_are_cut_off(gateway: str) -> None:
    with connect(gateway) as sock:
        sock.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        with contextlib.suppress(OSError):
            for _ in range(40):  # a header byte every 0.25 s, never the blank line
                sock.sendall(b"X")
                time.sleep(0.25)
                if select.select([sock], [], [], 0)[0] and sock.recv(1) == b"":
                    closed = True
                    break
        closed = closed or reply_of(sock) == b""
    assert closed and time.monotonic() - started < LIMITS.header_timeout + 2


def test_requests_beyond_the_concurrency_limit_get_503(gateway: str) -> None:
    url = f"http://{gateway}/v1/fleet/wait"
    with concurrent.futures.ThreadPoolExecutor(LIMITS.max_requests) as pool:
        held = [pool.submit(httpx.post, url, content=b"a", timeout=10) for _ in range(LIMITS.max_requests)]
        deadline = time.monotonic() + 10
        while len(Upstream.received) < LIMITS.max_requests:
            assert time.monotonic() < deadline, "the held requests did not reach the SuperLink"
            time.sleep(0.05)
        assert httpx.post(url, content=b"b", timeout=10).status_code == 503
        Upstream.release.set()
        assert [f.result().status_code for f in held] == [200] * LIMITS.max_requests
    assert httpx.post(f"http://{gateway}/v1/fleet/pull-messages", content=b"c", timeout=10).status_code == 200


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match=r"max_body must be positive\. Found 0\."):
        Limits(max_body=0)
