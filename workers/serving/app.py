"""The HTTP server of ``captrain serve``: routes, error answers and the app's life.

Every answer is JSON; every refusal is ``{"error": "one clear message"}`` with a 4xx
status (5xx only for the server's own failure), and the server goes on serving.
``POST /v1/read`` reads images in micro-batches (workers.serving.batcher) with the
model a source provides and follows (workers.serving.source).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from shared.errors import InputError
from workers.serving.batcher import Batcher
from workers.serving.guard import BadRequest, Guard
from workers.serving.inputs import Item, read_items
from workers.serving.metrics import Metrics
from workers.serving.runner import Runner
from workers.serving.source import FolderSource, RegistrySource, Source, follow

log = logging.getLogger("captrain.serve")
CONFIG_ENV = "CT_SERVE_CONFIG"  # not CAPTRAIN_*: those are settings, and unknown ones errors
# Measured on 2 cores: a single captcha decoded in the event loop saves about 0.5 ms of
# CPU per request over a hop to the thread pool (BENCHMARKS.md "Serving").
INLINE_PIXELS = 250_000
# Pillow names the in-memory file it was given ("<_io.BytesIO object at 0x...>").
_PILLOW_OBJECT = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class ServeConfig:
    """What ``captrain serve`` was asked for; JSON in CONFIG_ENV for worker processes."""

    model: str | None = None  # a registry reference, or
    folder: str | None = None  # an exported folder
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_images: int = 64
    max_body: int = 8 * 2**20
    poll_seconds: float = 2.0
    threads: int | None = None  # onnxruntime intra-op threads; None: this process's cores

    def source(self) -> Source:
        """The model source this config names."""
        if self.folder is not None:
            return FolderSource(Path(self.folder), self.threads)
        assert self.model is not None
        from shared.settings import get_settings

        return RegistrySource(self.model, get_settings().home / "serve", self.threads)

    def to_env(self) -> str:
        return json.dumps(asdict(self))


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory`` in each worker process: the config from
    CONFIG_ENV, the API key from the settings."""
    from shared.settings import get_settings

    config = ServeConfig(**json.loads(os.environ[CONFIG_ENV]))
    return create_app(config, get_settings().serve_api_key)


def create_app(config: ServeConfig, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``config``'s model; ``api_key`` guards every route but
    /healthz and /metrics when set."""
    metrics = Metrics()
    source = config.source()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        def on_batch(n: int) -> None:
            metrics.batch.observe(n)

        batcher = Batcher(config.max_batch, config.max_wait_ms / 1000, on_batch)
        stop = threading.Event()
        watcher = threading.Thread(target=follow, name="captrain-follow", daemon=True,
                                   args=(source, _Counted(batcher, metrics),
                                         config.poll_seconds, stop))
        app.state.batcher = batcher
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            batcher.close()

    app = FastAPI(title="captrain serve", lifespan=lifespan,
                  description="Read captcha images with a captrain model.")
    app.add_middleware(Guard, api_key=api_key, max_body=config.max_body, metrics=metrics)
    _errors(app)
    _routes(app, config, metrics)
    return app


class _Counted:
    """The batcher as ``follow`` sees it: each swap is counted and shown in /metrics."""

    def __init__(self, batcher: Batcher, metrics: Metrics) -> None:
        self._batcher = batcher
        self._metrics = metrics

    @property
    def current(self) -> Runner | None:
        return self._batcher.current

    def swap(self, runner: Runner) -> None:
        if self._batcher.current is not None:
            self._metrics.swaps.inc()
        self._batcher.swap(runner)
        self._metrics.model.info({"model": runner.label, "ref": runner.info.ref})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _errors(app: FastAPI) -> None:
    """Every refusal as ``{"error": ...}``: the app's own, Starlette's 404 and 405, a
    form Starlette could not parse, and anything unforeseen (500)."""

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return _error(exc.code, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        method, path = request.method, request.url.path
        message = {404: f"no route {path}: the routes are POST /v1/read, GET /v1/models, "
                        "/healthz, /readyz, /metrics and /docs",
                   405: f"{method} is not allowed on {path}"}.get(exc.status_code, exc.detail)
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return _error(422, f"invalid request: {first.get('msg', exc)}")

    @app.exception_handler(Exception)
    async def unforeseen(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")


READ_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "byte"}}}}},
}}}


def _routes(app: FastAPI, config: ServeConfig, metrics: Metrics) -> None:
    def loaded(request: Request) -> tuple[Batcher, Runner]:
        batcher: Batcher = request.app.state.batcher
        runner = batcher.current
        if runner is None:
            raise BadRequest(503, "the model is still loading; GET /readyz says when it is in")
        return batcher, runner

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded (503 before)")
    async def readyz(request: Request) -> dict[str, Any]:
        _, runner = loaded(request)
        return {"status": "ready", "model": runner.label}

    @app.get("/v1/models", summary="The model being served")
    async def models(request: Request) -> dict[str, Any]:
        _, runner = loaded(request)
        return {"models": [runner.info.public()]}

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/v1/read", summary="Read captcha images", openapi_extra=READ_BODY,
              responses={400: {"description": "a malformed request"},
                         401: {"description": "no or a wrong API key"},
                         413: {"description": "a body beyond the limit"},
                         422: {"description": "no image in the request could be read"}})
    async def read(request: Request) -> JSONResponse:
        """Read each image: `{"model", "results": [{"file", "text", "confidence"}]}`, an
        `error` in place of the text for an image that cannot be read."""
        batcher, runner = loaded(request)
        with batcher.coming():
            items = await read_items(request, config.max_images)
            if len(items) == 1 and _small(items[0]):
                arrays = _prepare(runner, items)  # a hop to a thread costs more than this
            else:
                arrays = await run_in_threadpool(_prepare, runner, items)
        good = [a for a in arrays if a is not None]
        metrics.images.labels("read").inc(len(good))
        metrics.images.labels("error").inc(len(items) - len(good))
        results = await batcher.read(runner, np.stack(good)) if good else []
        answers = _answers(items, results)
        if not good:
            return JSONResponse({"error": f"no image could be read: {items[0].error}",
                                 "model": runner.label, "results": answers}, status_code=422)
        return JSONResponse({"model": runner.label, "results": answers})


def _small(item: Item) -> bool:
    """Whether ``item``'s header claims at most INLINE_PIXELS (read without decoding):
    such an image is decoded in the event loop, anything larger in a thread, where it
    cannot hold up other requests."""
    if item.error is not None:
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reader itself refuses bombs
            width, height = Image.open(io.BytesIO(item.data)).size
    except Exception:  # anything unreadable goes to the reader, in a thread
        return False
    return width * height <= INLINE_PIXELS


def _prepare(runner: Runner, items: list[Item]) -> list[np.ndarray | None]:
    """Each item's model input, or None with ``item.error`` set."""
    out: list[np.ndarray | None] = []
    for item in items:
        if item.error is None:
            try:
                out.append(runner.prepare(item.data, str(item.name)))
                continue
            except InputError as exc:
                item.error = _PILLOW_OBJECT.sub("", str(exc))
            except (OSError, ValueError) as exc:  # Pillow past the reader's checks
                item.error = f"{item.name}: cannot be read ({exc})"
        out.append(None)
    return out


def _answers(items: list[Item], results: list[tuple[str, float]]) -> list[dict[str, Any]]:
    read = iter(results)
    out: list[dict[str, Any]] = []
    for item in items:
        if item.error is not None:
            out.append({"file": item.name, "error": item.error})
        else:
            text, conf = next(read)
            out.append({"file": item.name, "text": text, "confidence": round(conf, 4)})
    return out
