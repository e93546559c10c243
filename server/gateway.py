"""The Fleet gateway: the only door of a federation that institutions can reach.

Flower 1.41's SuperLink serves three HTTP APIs on one port: Fleet (SuperNodes),
Control (register node keys, submit and stop runs) and Runtime (the ServerApp
and SuperExec). Only Fleet authenticates its callers (by node key); the other
two trust whoever reaches the port. So ``fedsilo-server start`` binds the
SuperLink to loopback and runs this gateway on the public address: it holds the
federation's TLS certificate and forwards ``POST /v1/fleet/<call>`` and
``GET /health`` to the SuperLink, and nothing else. The coordinator's own tools
(``fedsilo-server admit/run/status``) reach the Control API over loopback.

    python -m fedsilo.server.gateway --listen 0.0.0.0:9092 --upstream 127.0.0.1:40123 \
        --certfile server.crt --keyfile server.key --ca ca.crt
"""

from __future__ import annotations

import argparse
import contextlib
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

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


def create_app(upstream: str, ca_cert: Path | None, timeout: float = 300.0) -> Starlette:
    """The gateway as an ASGI app forwarding allowed requests to the SuperLink at ``upstream``."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else False
    scheme = "https" if ca_cert else "http"
    client = httpx.AsyncClient(base_url=f"{scheme}://{upstream}", verify=verify, timeout=timeout)

    async def forward(request: Request) -> Response:
        if not allowed(request.method, request.url.path):
            return PlainTextResponse(REFUSAL, status_code=404)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        try:
            reply = await client.request(
                request.method, request.url.path, content=await request.body(), headers=headers
            )
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to bind (the federation's public address).")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the SuperLink (loopback).")
    parser.add_argument("--certfile", type=Path, help="Server certificate; without it the gateway speaks plain HTTP.")
    parser.add_argument("--keyfile", type=Path)
    parser.add_argument("--ca", type=Path, help="CA that signed the SuperLink's certificate.")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    uvicorn.run(
        create_app(args.upstream, args.ca),
        host=host.strip("[]"),
        port=int(port),
        ssl_certfile=str(args.certfile) if args.certfile else None,
        ssl_keyfile=str(args.keyfile) if args.keyfile else None,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
