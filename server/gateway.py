"""The Fleet gateway: the only door of a federation that institutions can reach.

Flower 1.41's SuperLink serves three HTTP APIs on one port: Fleet (SuperNodes),
Control (register node keys, submit and stop runs) and Runtime (the ServerApp
and SuperExec). Only Fleet authenticates its callers (by node key); the other
two trust whoever reaches the port. So ``fedsilo-server start`` binds the
SuperLink to loopback and runs this gateway on the public address: it holds the
federation's TLS certificate and forwards ``POST /v1/fleet/<call>`` and
``GET /health`` to the SuperLink, and nothing else. The coordinator's own tools
(``fedsilo-server admit/run/status``) reach the Control API over loopback.

Anyone who reaches the port can call it before any authentication (the
SuperLink checks node keys), so every request is bounded: a body larger than
``max_body`` is answered 413 before it is read (from its Content-Length) or as
soon as it passes the limit; at most ``max_requests`` requests are read and
forwarded at once (others get 503, which SuperNodes retry); a client has
``header_timeout`` seconds to send a request's headers (after connecting or
after its previous reply) and ``body_timeout`` seconds to send its body (408),
and a request ends within ``request_timeout`` seconds (504).

    python -m fedsilo.server.gateway --listen 0.0.0.0:9092 --upstream 127.0.0.1:40123 \
        --certfile server.crt --keyfile server.key --ca ca.crt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

# One path segment of lower-case words: no "..", no encoded slashes, no other API.
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]*")
# Headers that belong to one hop, or that httpx recomputes for the next.
HOP_HEADERS = frozenset(
    {"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length", "content-encoding"}
)
REFUSAL = "fedsilo gateway: only the Fleet API is served on this port\n"


def allowed(method: str, path: str) -> bool:
    """Whether a request may pass: a Fleet call, or the health check."""
    return (method == "POST" and FLEET_PATH.fullmatch(path) is not None) or (method == "GET" and path == "/health")


@dataclass(frozen=True)
class Limits:
    """What one client may cost the gateway (see the module docstring)."""

    max_body: int = 16 * 1024 * 1024  # Flower sends arrays in chunks of 5 MB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
    max_requests: int = 64
    max_connections: int = 512
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    request_timeout: float = 120.0

    def __post_init__(self) -> None:
        problems = [f"{name} must be positive. Found {value}." for name, value in vars(self).items() if value <= 0]
        if problems:
            raise ValueError(" ".join(problems))


class _TooLarge(Exception):
    """A request body over the limit."""


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (``_TooLarge``) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _refusal(text: str, status: int) -> Response:
    # The connection closes after it: what the client still sends is not read.
    return PlainTextResponse(f"fedsilo gateway: {text}\n", status_code=status, headers={"connection": "close"})


def create_app(upstream: str, ca_cert: Path | None, limits: Limits | None = None) -> Starlette:
    """The gateway as an ASGI app forwarding allowed requests to the SuperLink at ``upstream``."""
    limits = limits or Limits()
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else False
    scheme = "https" if ca_cert else "http"
    client = httpx.AsyncClient(base_url=f"{scheme}://{upstream}", verify=verify, timeout=limits.request_timeout)
    in_flight = asyncio.Semaphore(limits.max_requests)

    async def forward(request: Request) -> Response:
        if not allowed(request.method, request.url.path):
            return PlainTextResponse(REFUSAL, status_code=404)
        if in_flight.locked():
            return _refusal("too many requests at once; retry", 503)
        async with in_flight:
            try:
                async with asyncio.timeout(limits.body_timeout):
                    body = await _read_body(request, limits.max_body)
            except _TooLarge:
                return _refusal(f"request body over {limits.max_body} bytes", 413)
            except TimeoutError:
                return _refusal(f"request body not received within {limits.body_timeout:g} s", 408)
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
            try:
                async with asyncio.timeout(limits.request_timeout):
                    reply = await client.request(request.method, request.url.path, content=body, headers=headers)
            except TimeoutError:
                return _refusal(f"the SuperLink did not answer within {limits.request_timeout:g} s", 504)
            except httpx.TransportError:
                # The SuperLink is restarting or gone; SuperNodes retry on 503.
                return PlainTextResponse("fedsilo gateway: the SuperLink is not answering\n", status_code=503)
        kept = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_HEADERS}
        return Response(reply.content, status_code=reply.status_code, headers=kept)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


class _HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that takes too long to send a request's headers.

    uvicorn has no such timeout: a client that sends a header byte now and then
    would hold its connection for ever. The clock starts when the connection is
    made (after the TLS handshake) and again after each reply.
    """

    header_timeout = Limits.header_timeout
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.header_timeout, self._expire, self.cycle)

    def _expire(self, armed: Any) -> None:
        # Still the request that was current when armed, and it is answered (or there was none):
        # no new request's headers arrived in time.
        idle = self.cycle is armed and (armed is None or armed.response_complete)
        if idle and not self.transport.is_closing():
            self.transport.close()


def server_config(
    upstream: str,
    ca_cert: Path | None,
    *,
    host: str,
    port: int,
    limits: Limits | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
) -> uvicorn.Config:
    """The gateway's uvicorn configuration: the app and the limits on every connection."""
    limits = limits or Limits()
    protocol = type("HeaderDeadline", (_HeaderDeadline,), {"header_timeout": limits.header_timeout})
    return uvicorn.Config(
        create_app(upstream, ca_cert, limits),
        host=host,
        port=port,
        http=protocol,
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=16 * 1024,  # request line and headers (h11's own default)
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        log_level="warning",
        access_log=False,
    )


def main() -> None:
    defaults = Limits()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to bind (the federation's public address).")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the SuperLink (loopback).")
    parser.add_argument("--certfile", type=Path, help="Server certificate; without it the gateway speaks plain HTTP.")
    parser.add_argument("--keyfile", type=Path)
    parser.add_argument("--ca", type=Path, help="CA that signed the SuperLink's certificate.")
    for name, value in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(value), default=value, help=f"default: {value}")
    args = parser.parse_args()
    limits = Limits(**{name: getattr(args, name) for name in vars(defaults)})
    host, _, port = args.listen.rpartition(":")
    config = server_config(
        args.upstream,
        args.ca,
        host=host.strip("[]"),
        port=int(port),
        limits=limits,
        certfile=args.certfile,
        keyfile=args.keyfile,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
