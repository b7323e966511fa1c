"""The HTTP gateway: ``POST /v1/readings`` into the ingest stage's input topic.

A Starlette application served by uvicorn (:func:`serve_http`). A request is
answered, in this order:

1. 401 without a known bearer token (:mod:`pipeline.edge.auth`);
2. 415 for a content type or encoding it does not read; 413 when
   ``Content-Length`` is over ``edge.http.max_body_bytes``;
3. the body is read within ``read_timeout_s`` (408) and at most
   ``max_body_bytes`` (413), gunzipped to at most ``max_decoded_bytes`` (413),
   split into records (400/413, :mod:`pipeline.edge.split`);
4. 403 if a record names a device outside the token's prefix: nothing is written;
5. 503 + Retry-After while the broker does not answer; 429 + Retry-After when
   ``max_in_flight_records`` are already waiting for it: nothing is written;
6. every record is produced and **acknowledged** (503 if not within
   ``ack_timeout_s``), then 202 ``{"accepted": n}``.

So a client that gets anything but 202 may send the same request again; records
of a request that failed after producing may then be in Kafka twice, which ingest
(repeats) and the aggregate (lineage ids) make harmless. Logs name the status and
the reason, never a token or a payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator

import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.contract import H_TRACEPARENT, child_traceparent_bytes
from pipeline.edge.auth import TokenStore
from pipeline.edge.openapi import openapi_document
from pipeline.edge.split import BodyError, content_kind, decode_content, split_body
from pipeline.edge.writer import BrokerProbe, EdgeWriter, target_topic
from pipeline.errors import DeliveryError, Overloaded
from pipeline.obs.metrics import EDGE_REJECTED, EDGE_REQUEST_SECONDS, EDGE_REQUESTS, REGISTRY
from pipeline.records import Outgoing
from pipeline.settings import Settings

log = logging.getLogger("pipeline.edge.http")

#: a body over the limit is still read (and dropped) up to this many bytes, so the
#: client sees the 413 instead of a connection reset while it is still sending
_DRAIN_BYTES = 32 * 1024 * 1024


class _Answer(Exception):
    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.headers = headers or {}


class Gateway:
    """The state the routes share: settings, tokens, the writer and the probe."""

    def __init__(self, settings: Settings, tokens: TokenStore) -> None:
        self.settings = settings
        self.limits = settings.edge.http
        self.tokens = tokens
        self.topic = target_topic(settings)
        #: never past what the producer accepts (a refused record would half-write)
        self.max_record_bytes = min(
            self.limits.max_record_bytes, settings.runner.max_message_bytes - 4096
        )
        self.writer: EdgeWriter | None = None
        self.probe: BrokerProbe | None = None
        self.openapi = orjson.dumps(openapi_document(self.limits))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.probe = BrokerProbe(self.settings).start()
        self.writer = EdgeWriter(
            self.settings,
            self.topic,
            door="http",
            max_in_flight=self.limits.max_in_flight_records,
            ack_timeout_s=self.limits.ack_timeout_s,
        )
        log.info("gateway writing to %s", self.topic)
        try:
            yield
        finally:
            self.probe.stop()
            await asyncio.to_thread(self.writer.close, 10.0)

    # -- routes -------------------------------------------------------------------

    async def readings(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            accepted = await self._accept(request)
            response: Response = JSONResponse({"accepted": accepted}, status_code=202)
        except _Answer as answer:
            EDGE_REJECTED.labels("http", answer.reason).inc()
            if answer.status >= 500:
                log.warning("answered %d: %s", answer.status, answer.message)
            response = JSONResponse(
                {"error": answer.message}, status_code=answer.status, headers=answer.headers
            )
        EDGE_REQUESTS.labels(str(response.status_code)).inc()
        EDGE_REQUEST_SECONDS.observe(time.perf_counter() - started)
        return response

    async def _accept(self, request: Request) -> int:
        limits = self.limits
        grant = self.tokens.authenticate(request.headers.get("authorization"))
        if grant is None:
            raise _Answer(
                401,
                "unauthorized",
                "missing or unknown bearer token",
                {"WWW-Authenticate": 'Bearer realm="readings"'},
            )
        try:
            kind = content_kind(request.headers.get("content-type"))
            encoding = request.headers.get("content-encoding")
            body = await self._body(request)
            body = decode_content(body, encoding, limits.max_decoded_bytes)
            pieces = split_body(
                body,
                kind,
                max_records=limits.max_records,
                max_record_bytes=self.max_record_bytes,
            )
        except BodyError as exc:
            raise _Answer(exc.status, exc.reason, exc.message) from None
        for index, (_, device) in enumerate(pieces):
            if not grant.allows(device):
                raise _Answer(
                    403,
                    "forbidden",
                    f"record {index}: its device is outside this token's device-id prefix",
                )
        writer, probe = self.writer, self.probe
        if writer is None or probe is None or not probe.reachable():
            raise _Answer(
                503,
                "unavailable",
                "Kafka is unreachable; try again later",
                {"Retry-After": str(limits.unavailable_retry_after_s)},
            )
        traceparent = request.headers.get("traceparent")
        headers = (
            [(H_TRACEPARENT, child_traceparent_bytes(traceparent.encode("ascii", "replace")))]
            if traceparent
            else []
        )
        topic = self.topic
        records: list[Outgoing] = [
            (topic, device.encode("utf-8") if device is not None else None, value, headers, None)
            for value, device in pieces
        ]
        try:
            await writer.write(records)
        except Overloaded:
            raise _Answer(
                429,
                "overloaded",
                "too many readings waiting for Kafka; try again shortly",
                {"Retry-After": str(limits.retry_after_s)},
            ) from None
        except DeliveryError as exc:
            raise _Answer(
                503,
                "unavailable",
                f"{exc}; try again later",
                {"Retry-After": str(limits.unavailable_retry_after_s)},
            ) from None
        return len(records)

    async def _body(self, request: Request) -> bytes:
        """The raw body, at most ``max_body_bytes`` (413), within ``read_timeout_s`` (408)."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise _Answer(400, "bad_body", "Content-Length is not a number") from None
            if length > limit:
                if length <= _DRAIN_BYTES:
                    await self._drain(request)
                raise _Answer(413, "too_large", f"the body is over {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.read_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        break
                    chunks.append(chunk)
        except TimeoutError:
            raise _Answer(
                408, "timeout", f"the body did not arrive within {self.limits.read_timeout_s:g}s"
            ) from None
        if size > limit:
            raise _Answer(413, "too_large", f"the body is over {limit} bytes")
        return b"".join(chunks)

    async def _drain(self, request: Request) -> None:
        """Read and drop the body (bounded in bytes and time) so the 413 reaches a
        client that writes its whole body before it reads the answer."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.limits.read_timeout_s):
                async for _ in request.stream():
                    pass

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    def problems(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        broker = self.probe.problem() if self.probe is not None else "starting"
        if broker is not None:
            problems["broker"] = broker
        if self.tokens.problem is not None:
            problems["tokens"] = self.tokens.problem
        return problems

    async def healthz(self, request: Request) -> Response:
        """Alive while the event loop answers; the problems are reported, not fatal: a
        restart cures neither a lost broker nor a bad tokens file."""
        problems = self.problems()
        return JSONResponse({"status": "ok" if not problems else "degraded", "problems": problems})

    async def readyz(self, request: Request) -> Response:
        """Ready once started and the broker answered; a lost broker later keeps it
        ready so clients get 503 + Retry-After from the gateway, not a closed port."""
        ready = self.writer is not None and self.probe is not None and bool(self.probe.topics)
        return JSONResponse(
            {"status": "ready" if ready else "not ready"}, status_code=200 if ready else 503
        )

    async def openapi_json(self, request: Request) -> Response:
        return Response(self.openapi, media_type="application/json")


def build_app(settings: Settings, tokens: TokenStore) -> Starlette:
    """The ASGI application: nothing starts until the server runs its lifespan."""
    gateway = Gateway(settings, tokens)
    routes = [
        Route("/v1/readings", gateway.readings, methods=["POST"]),
        Route("/metrics", gateway.metrics, methods=["GET"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/readyz", gateway.readyz, methods=["GET"]),
        Route("/openapi.json", gateway.openapi_json, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=gateway.lifespan)


def serve_http(settings: Settings, tokens: TokenStore, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, then let requests in flight finish and return
    (exit code 0: a stop asked for is not a failure)."""
    config = uvicorn.Config(
        build_app(settings, tokens),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,  # request lines are metrics; nothing about clients in logs
        server_header=False,
        proxy_headers=False,
        limit_concurrency=settings.edge.http.max_connections,
        timeout_keep_alive=15,
        timeout_graceful_shutdown=int(settings.edge.http.ack_timeout_s) + 5,
        h11_max_incomplete_event_size=16 * 1024,  # request line and headers
    )
    server = _Server(config)
    asyncio.run(server.serve())


class _Server(uvicorn.Server):
    """uvicorn's server without re-raising the stop signal after a graceful stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _stop(self) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True
