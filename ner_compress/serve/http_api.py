"""The HTTP API over FastAPI: ``POST /predict``, ``GET /health``, ``/ready``, ``/metrics``.

Every refusal is a JSON ``{"error": ..., "request_id": ...}`` naming the field or flag at fault.
The body of ``/predict`` is read here, not by FastAPI, so its size is checked before (declared
``Content-Length``) and while (streamed bytes) it arrives, and never held beyond
``--max_body_bytes``; a body not complete within ``--body_timeout_s`` is answered 408 and its
connection closed, so a client that stops mid-body does not hold it. An access-log line and the
metrics are written by one ASGI middleware.
"""
import asyncio
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from typing import List

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from ner_compress.serve.batching import DynamicBatcher, QueueFull
from ner_compress.serve.prometheus import CONTENT_TYPE, ServerMetrics

log = logging.getLogger("ner_compress")
access_log = logging.getLogger("ner_compress.access")
ROUTES = ("/predict", "/health", "/ready", "/metrics", "/docs", "/openapi.json")
CLIENT_CLOSED = 499  # nginx's code for a client that left before the answer


class ApiError(Exception):
    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# --- the API's shapes, for the OpenAPI page ---------------------------------------------------

class PredictRequest(BaseModel):
    texts: List[str] = Field(..., description="texts to tag; long ones are windowed and stitched",
                             examples=[["中国人民银行在北京召开会议"]])


class Entity(BaseModel):
    type: str = Field(..., description="PER, LOC or ORG")
    start: int = Field(..., description="offset of the first character")
    end: int = Field(..., description="offset after the last character")
    text: str


class Result(BaseModel):
    text: str
    entities: List[Entity]


class PredictResponse(BaseModel):
    results: List[Result] = Field(..., description="one per input text, in order")


class ErrorBody(BaseModel):
    error: str
    request_id: str


ERRORS = {400: "invalid JSON or wrong shape", 408: "body not complete within --body_timeout_s",
          413: "body, text count or text length over a limit",
          499: "client left", 500: "internal error (logged with its traceback)",
          503: "model not ready or queue full (see Retry-After)"}


# --- reading and checking a request ------------------------------------------------------------

async def read_body(request, max_bytes, timeout_s):
    """The raw body, refused with 413 as soon as it is known to exceed ``max_bytes``, and with 408 if it
    is not complete within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            return await read_limited_body(request, max_bytes)
    except TimeoutError:
        raise ApiError(408, f"body: not complete within --body_timeout_s {timeout_s:g} s; send the whole body "
                            "at once", {"Connection": "close"}) from None


async def read_limited_body(request, max_bytes):
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length: {declared!r} is not a byte count")
        if int(declared) > max_bytes:
            raise ApiError(413, f"body: {int(declared)} bytes is over --max_body_bytes {max_bytes}; "
                                "send fewer or shorter texts per request", {"Connection": "close"})
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"body: over --max_body_bytes {max_bytes}; send fewer or shorter texts per request",
                           {"Connection": "close"})
        chunks.append(chunk)
    return b"".join(chunks)


def parse_texts(body, max_texts, max_chars):
    """The ``texts`` list of a ``/predict`` body, or ``ApiError`` naming what is wrong."""
    shape = 'send {"texts": ["...", ...]}'
    try:
        payload = json.loads(body)
    except UnicodeDecodeError as err:
        raise ApiError(400, f"body: not valid UTF-8 at byte {err.start}; send UTF-8 JSON") from None
    except ValueError as err:
        raise ApiError(400, f"body: not valid JSON ({err}); {shape}") from None
    except RecursionError:
        raise ApiError(400, f"body: JSON nested too deeply; {shape}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(payload).__name__}; {shape}")
    unknown = sorted(set(payload) - {"texts"})
    if unknown:
        raise ApiError(400, f"body: unknown field {unknown[0]!r}; {shape}")
    if "texts" not in payload:
        raise ApiError(400, f"texts: missing; {shape}")
    texts = payload["texts"]
    if not isinstance(texts, list):
        raise ApiError(400, f"texts: expected a list of strings, got {type(texts).__name__}")
    if len(texts) > max_texts:
        raise ApiError(413, f"texts: {len(texts)} texts is over --max_texts {max_texts}; split the request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ApiError(400, f"texts[{i}]: expected a string, got {type(text).__name__}")
        if len(text) > max_chars:
            raise ApiError(413, f"texts[{i}]: {len(text)} characters is over --max_chars {max_chars}; split the text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ApiError(400, f"texts[{i}]: unpaired surrogate at character {err.start}; send valid Unicode") \
                from None
    return texts


def error_response(status, message, request_id, headers=None):
    return JSONResponse({"error": message, "request_id": request_id}, status_code=status, headers=headers)


# --- access log and metrics --------------------------------------------------------------------

class AccessLog:
    """ASGI middleware: a request id for every request, then one log line and the metrics."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {}).update(request_id=request_id, texts=0)
        status = [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            path = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.record_request(path, status[0], seconds)
            access_log.info("%s %s %d texts=%d %.1fms id=%s", scope["method"], scope["path"], status[0],
                            scope["state"].get("texts", 0), seconds * 1000, request_id)


# --- the app ------------------------------------------------------------------------------------

def create_app(options, load_tagger):
    """The FastAPI app; ``load_tagger()`` builds the tagger in the predictor thread."""
    metrics = ServerMetrics()
    batcher = DynamicBatcher(load_tagger, options.max_batch_size, options.max_wait_ms, options.max_queue,
                             options.warmup_batches, on_batch=metrics.record_batch)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()  # uvicorn has finished the in-flight requests by now

    app = FastAPI(title="ner_compress NER service", version="1", lifespan=lifespan,
                  description="Chinese named entities (PER, LOC, ORG) from an exported static model, "
                              "with dynamic batching across concurrent requests.")
    app.state.batcher = batcher

    @app.post("/predict", response_model=PredictResponse, responses={k: {"model": ErrorBody, "description": v}
                                                                      for k, v in ERRORS.items()},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": PredictRequest.model_json_schema()}}}})
    async def predict(request: Request):
        """Tag texts: ``{"texts": [...]}`` -> ``{"results": [{"text", "entities"}]}``."""
        request_id = request.state.request_id
        try:
            body = await read_body(request, options.max_body_bytes, options.body_timeout_s)
            texts = parse_texts(body, options.max_texts, options.max_chars)
            request.state.texts = len(texts)
            if not batcher.ready.is_set():
                raise ApiError(503, "model: not ready yet (loading or warming up); poll GET /ready",
                               {"Retry-After": "1"})
            results = await batcher.submit(texts) if texts else []
        except ApiError as err:
            return error_response(err.status, err.message, request_id, err.headers)
        except QueueFull as err:
            return error_response(503, f"queue full: {err}; retry later", request_id, {"Retry-After": "1"})
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED)
        except Exception as err:  # never the traceback in the body; the log has it
            log.error("request %s failed", request_id, exc_info=err)
            return error_response(500, "internal error; quote the request_id when reporting it", request_id)
        return JSONResponse({"results": results})

    served = {"backend": options.backend, "precision": options.precision, "device": options.device,
              "model_dir": os.path.abspath(options.model_dir)}

    @app.get("/health")
    async def health():
        """The process is up and answering (the model may still be loading); which model, on what."""
        return {"status": "ok", **served}

    @app.get("/ready", responses={503: {"description": "model still loading or warming up, or failed to load"}})
    async def ready():
        """200 once the model is loaded and warmed up; 503 before (or if loading failed)."""
        if batcher.ready.is_set():
            return {"ready": True}
        body = {"ready": False, "error": batcher.load_error} if batcher.load_error else {"ready": False}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics():
        """Prometheus text format: requests by status, batch sizes, latency, queue, readiness."""
        return Response(metrics.render(batcher.queued_texts, batcher.ready.is_set()), media_type=CONTENT_TYPE)

    return AccessLog(app, metrics)
