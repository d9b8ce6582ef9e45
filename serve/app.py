"""The HTTP front end (FastAPI): rank, models, examples, health, metrics and hot reload.

    app = create_app(Registry.open(discover_runs(Path("runs")), EngineConfig()), HttpConfig(), admin_token=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)     # what `python -m serve` does, with a graceful drain

Endpoints (the OpenAPI schema is at /openapi.json, browsable at /docs):

    POST /v1/rank                 RankBody -> RankReply, candidates in request order
    GET  /v1/models               every model's version and feature schema (Engine.describe())
    GET  /v1/models/{name}/example  a valid RankBody for that model (Engine.example_request())
    GET  /healthz                 {"status": "ok", "models": [...]}
    GET  /metrics                 Prometheus text exposition (serve.metrics)
    POST /admin/reload[?model=]   hot swap to the newest checkpoint (a model reloads with those that share
                                  its user model); `Authorization: Bearer TOKEN`

Errors are JSON `{"error": {"status", "type", "message", "field"}}` where `field` is the body path
of the offending value (e.g. "candidates[3].features.ad_price") or null:

    400 malformed_json     the body is not JSON (or not UTF-8, or nested too deep)
    415 unsupported_media_type  a Content-Type other than application/json (none is taken as JSON)
    408 body_timeout       the body did not wholly arrive within HttpConfig.body_timeout_s (connection closed)
    413 too_large          the body is over HttpConfig.max_body_bytes, or holds more JSON values than the
                           largest valid request to any served model (max_candidates x features)
    422 invalid_request    wrong types, unknown or missing fields, NaN/Infinity, ids out of range,
                           too many candidates (pydantic's checks and the engine's RequestError alike),
                           or feature values so extreme that the model's scores are not finite
    404 unknown_model      no model of that name is served
    401 / 403              admin endpoints: wrong or missing token / no token configured ("admin disabled")
    409 swap_failed        /admin/reload: the new checkpoint cannot replace the served one (kept)
    503 overloaded         more than max_in_flight rank requests at once (refused before parsing the
                           body; requests still receiving theirs do not count), the engine's queue is
                           full, or the request outwaited request_timeout_s; carries Retry-After (seconds)

A client that closes the connection before its body has arrived gets nothing; /metrics counts the
request under code="499".
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hmac
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from pydantic_core import to_json
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from serve.engine import EngineClosed, Overloaded, RankResponse, SwapError
from serve.metrics import CONTENT_TYPE, HttpMetrics, render
from serve.registry import Registry, UnknownModel
from serve.request import RankRequest, RequestError, json_counts

__all__ = ["ApiError", "Candidate", "HttpConfig", "RankBody", "RankReply", "create_app"]

MAX_ABS_INT = 2**63 - 1  # larger JSON integers are refused before they reach float() or int64
CLIENT_CLOSED = 499
"""the status recorded (nginx's convention) for a request whose client closed the connection before
its body arrived: no answer reaches anyone, and it is not a server error"""


@dataclasses.dataclass(frozen=True)
class HttpConfig:
  request_timeout_s: float = 10.0
  """a rank request still waiting for the engine after this long is answered 503 (and cancelled if queued)"""
  retry_after_s: int = 1
  """the Retry-After header of a 503"""
  max_in_flight: int = 32
  """rank requests handled at once once their body has arrived (validating, queued or scoring);
  beyond, 503 without parsing the body. Bounds the wait to about max_in_flight / throughput. A
  request still receiving its body does not count: slow senders cannot take every slot"""
  max_body_bytes: int = 2 << 20
  """larger request bodies are answered 413 (1024 candidates of the ads world take about 250 kB);
  so is a body with more JSON values than any served model's largest valid request holds
  (serve.request.RequestEncoder.max_json_values), before it is parsed"""
  body_timeout_s: float = 10.0
  """a rank request whose body has not wholly arrived this long after the server started reading it
  is answered 408 and its connection closed"""

  def __post_init__(self):
    if (self.request_timeout_s <= 0 or self.body_timeout_s <= 0 or self.retry_after_s < 0 or self.max_body_bytes < 1
        or self.max_in_flight < 1):
      raise ValueError("request_timeout_s, body_timeout_s, max_in_flight and max_body_bytes must be positive, "
                       "retry_after_s >= 0")


# ---- request and response bodies


# Feature values are checked where they are encoded (serve.request.encode_request: numbers finite and
# within float32, ids integers in the feature's range, names known), with errors naming the field;
# validating them here as well cost more event-loop time per request than everything else together
# (about 7 pydantic-to-Python validator calls per candidate). The schema still documents them.
FeatureValue = Annotated[Any, WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "number"},
                                                        {"type": "array", "items": {"type": "integer"}}]})]
Features = dict[str, FeatureValue]


class _Strict(BaseModel):
  model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class Candidate(_Strict):
  item_id: int = Field(ge=-MAX_ABS_INT, le=MAX_ABS_INT, description="the client's id for this candidate, echoed back")
  features: Features = Field(default_factory=dict, description="this candidate's features (e.g. ad_id); "
                             "they override the request's features of the same name")


class RankBody(_Strict):
  model: str = Field(description="a served model's name (GET /v1/models)")
  user_id: int | None = Field(default=None, ge=0, le=MAX_ABS_INT,
                              description="the user, for models with a user tower (SUM); optional otherwise")
  features: Features = Field(default_factory=dict, description="request-level features, shared by every candidate")
  candidates: list[Candidate] = Field(min_length=1, description="the items to score, at least one and at most "
                                      "the model's max_candidates (GET /v1/models)")


class ScoredCandidate(BaseModel):
  item_id: int
  scores: dict[str, float] = Field(description="{objective: probability}")


class RankReply(BaseModel):
  model: str
  model_version: int = Field(description="the checkpoint step that scored this request")
  user_embedding_source: Literal["direct", "fresh", "failover", "fallback"] | None = Field(
      description="where the user embedding came from (SUM models); null for plain rankers")
  user_embedding_version: int | None = Field(
      default=None, description="the user-model checkpoint step that wrote the served embedding (the newest of "
      "the averaged ones); null for plain rankers and the fallback embedding")
  user_embedding_age_s: int | None = Field(
      default=None, description="seconds since the served embedding was written; null for plain rankers and the "
      "fallback embedding")
  candidates: list[ScoredCandidate] = Field(description="in request order")


class ErrorDetail(BaseModel):
  status: int
  type: str
  message: str
  field: str | None = None


class ErrorReply(BaseModel):
  error: ErrorDetail


# ---- errors


def _error(status: int, kind: str, message: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
  body = {"error": {"status": status, "type": kind, "message": message, "field": field}}
  return JSONResponse(body, status_code=status, headers=headers)


class ApiError(Exception):
  """An error answered as JSON {"error": {...}} (see the module docstring)."""

  def __init__(self, status: int, kind: str, message: str, field: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.kind, self.message, self.field, self.headers = status, kind, message, field, headers

  def response(self) -> JSONResponse:
    return _error(self.status, self.kind, self.message, self.field, self.headers)


def _loc_to_field(loc: tuple) -> str | None:
  """("body", "candidates", 3, "features", "x") -> "candidates[3].features.x"."""
  out = ""
  for part in loc[1:] if loc and loc[0] == "body" else loc:
    out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
  return out or None


def _engine_error(e: RequestError) -> JSONResponse:
  """RequestError's where="candidates[3]", name="ad_id" is the body's candidates[3].features.ad_id."""
  if e.where is None:
    return _error(422, "invalid_request", str(e))
  field = e.where
  if e.name is not None:
    field += (".features." if e.where.startswith("candidates[") else ".") + e.name
  return _error(422, "invalid_request", f"{field}: {e.reason}", field)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
  return _validation_error(exc.errors())


def _validation_error(errors) -> JSONResponse:
  """The 400/415/422 answer to pydantic's errors (FastAPI's, with locations under "body", or
  `model_validate_json`'s)."""
  first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
  if first["type"] == "json_invalid":
    where = f" at character {first['loc'][-1]}" if first["loc"] else ""
    return _error(400, "malformed_json", f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}{where}")
  if tuple(first["loc"]) == ("body",) and isinstance(first.get("input"), (bytes, bytearray)):
    return _error(415, "unsupported_media_type", "the body must be JSON sent as Content-Type: application/json")
  field = _loc_to_field(tuple(first["loc"]))
  more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
  msg = first["msg"].removeprefix("Value error, ")
  return _error(422, "invalid_request", f"{field or 'body'}: {msg}{more}", field)


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
  kinds = {400: "malformed_json", 401: "unauthorized", 403: "forbidden", 404: "not_found",
           405: "method_not_allowed", 413: "too_large"}
  return _error(exc.status_code, kinds.get(exc.status_code, "error"), str(exc.detail),
                headers=getattr(exc, "headers", None))


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
  return exc.response()


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
  return _error(500, "internal", f"internal error: {type(exc).__name__}")


# ---- observation and body limit (pure ASGI, no per-request task)


async def _discard_body(receive) -> None:
  while (message := await receive())["type"] == "http.request" and message.get("more_body", False):
    pass


class _InFlight:
  """Rank requests whose body has arrived and that are being validated, queued or scored (touched on
  the event loop's thread only)."""

  def __init__(self, limit: int):
    self.limit, self.count = limit, 0

  def full(self) -> bool:
    return self.count >= self.limit

  def shed(self, retry_after_s: int) -> JSONResponse:
    return _error(503, "overloaded", f"{self.count} rank requests in flight (max_in_flight)",
                  headers={"Retry-After": str(retry_after_s)})


class _Front:
  """Pure ASGI, around the whole app: counts and times every HTTP request into HttpMetrics (route
  template, model, status); answers 413 to a Content-Length over the limit (a chunked body over it
  fails to parse); and sheds rank requests with 503 while `max_in_flight` are in flight, before
  parsing their body, so an overloaded server refuses work for the price of reading it. The rank
  handler counts a request in flight once its body has arrived (and sheds it then if the count is
  full): a client trickling its body holds a socket, not a slot."""

  def __init__(self, app, metrics: HttpMetrics, cfg: HttpConfig, in_flight: _InFlight):
    self.app, self.metrics, self.cfg, self.in_flight = app, metrics, cfg, in_flight

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    t0 = time.perf_counter()
    status, seen, limit = 500, 0, self.cfg.max_body_bytes
    rank = scope["path"] == "/v1/rank" and scope["method"] == "POST"

    async def send_observed(message):
      nonlocal status
      if message["type"] == "http.response.start":
        status = message["status"]
      await send(message)

    async def receive_limited():
      nonlocal seen
      message = await receive()
      seen += len(message.get("body", b""))
      if seen > limit:
        raise HTTPException(413, f"request body over {limit} bytes")
      return message

    length = dict(scope["headers"]).get(b"content-length", b"0")
    try:
      if not length.isdigit():
        await _error(400, "malformed_json", "invalid Content-Length")(scope, receive, send_observed)
      elif int(length) > limit:
        await _error(413, "too_large", f"request body over {limit} bytes")(scope, receive, send_observed)
      elif rank and self.in_flight.full():
        await _discard_body(receive)  # a socket closed with unread data resets: the client would lose the 503
        await self.in_flight.shed(self.cfg.retry_after_s)(scope, receive, send_observed)
      else:
        await self.app(scope, receive_limited, send_observed)
    finally:
      path = getattr(scope.get("route"), "path", "/v1/rank" if rank else "other")
      self.metrics.observe(path, scope.get("jaxrec.model", ""), status, time.perf_counter() - t0)


# ---- the app


def _first_non_finite(resp: RankResponse) -> int | None:
  """The first candidate with a NaN or infinite score (any objective), or None."""
  bad = ~np.isfinite(np.stack(list(resp.scores.values()), axis=1)).all(axis=1)
  return int(np.argmax(bad)) if bad.any() else None


def _reply(name: str, resp: RankResponse, item_ids: list[int]) -> bytes:
  cols = {t: s.tolist() for t, s in resp.scores.items()}
  objectives = list(cols)
  rows = zip(*(cols[t] for t in objectives))
  ue = resp.user_embedding
  return to_json({  # pydantic's Rust serializer: a fifth of json.dumps's time for 200 candidates
      "model": name, "model_version": int(resp.model_version),
      "user_embedding_source": None if ue is None else ue.source,
      "user_embedding_version": None if ue is None or ue.version < 0 else ue.version,
      "user_embedding_age_s": None if ue is None or ue.age_s < 0 else ue.age_s,
      "candidates": [{"item_id": i, "scores": dict(zip(objectives, r))} for i, r in zip(item_ids, rows)],
  })


def create_app(registry: Registry, cfg: HttpConfig = HttpConfig(), *, admin_token: str | None = None,
               metrics: HttpMetrics | None = None,
               metrics_source: Callable[[], tuple[HttpMetrics, dict]] | None = None) -> FastAPI:
  """The FastAPI app over `registry`'s started engines. The caller owns their lifecycle (start before,
  `registry.close(drain=True)` after the server stops). `admin_token` None disables /admin.
  `metrics_source` gives /metrics its (HTTP metrics, {model: engine stats}); by default this app's
  `metrics` and the registry's engines (serve.workers passes the sum over its worker processes)."""
  metrics = metrics or HttpMetrics()
  if metrics_source is None:
    def metrics_source():
      return metrics, {n: registry.engines[n].stats() for n in registry.names}
  app = FastAPI(title="jaxrec serving", version="1", description=__doc__.split("\n\n")[0],
                strict_content_type=False)
  app.add_exception_handler(RequestValidationError, _on_validation_error)
  app.add_exception_handler(HTTPException, _on_http_error)
  app.add_exception_handler(ApiError, _on_api_error)
  app.add_exception_handler(Exception, _on_unexpected)
  in_flight = _InFlight(cfg.max_in_flight)
  app.add_middleware(_Front, metrics=metrics, cfg=cfg, in_flight=in_flight)
  limits: list[tuple[int, int]] = []  # RequestEncoder's (max_json_objects, max_json_values) over every model

  def json_limits() -> tuple[int, int]:
    if not limits:
      encoders = [registry.engines[n].encoder() for n in registry.names]
      limits.append((max(e.max_json_objects() for e in encoders), max(e.max_json_values() for e in encoders)))
    return limits[0]

  app.state.registry, app.state.metrics = registry, metrics
  errors = {c: {"model": ErrorReply} for c in (400, 404, 413, 422, 503)}

  def engine_for(request: Request, name: str):
    try:
      eng = registry.get(name)
    except UnknownModel as e:
      raise ApiError(404, "unknown_model", str(e), "model") from None
    request.scope["jaxrec.model"] = name  # a metrics label only once known: clients cannot grow it
    return eng

  # The body is parsed and checked by pydantic's Rust JSON parser in one pass (model_validate_json),
  # not by FastAPI (Python's json, then validation): the schema is declared for /openapi.json below.
  @app.post("/v1/rank", response_model=RankReply, responses=errors, summary="Score candidates for one user",
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/RankBody"}}}}})
  async def rank(request: Request) -> Response:
    kind = request.headers.get("content-type")
    if kind is not None and not _is_json(kind):
      return _error(415, "unsupported_media_type", "the body must be JSON sent as Content-Type: application/json")
    try:
      raw = await asyncio.wait_for(request.body(), cfg.body_timeout_s)
    except ClientDisconnect:  # the client hung up before sending its body: nobody to answer, not a 5xx
      return Response(status_code=CLIENT_CLOSED)
    except TimeoutError:
      return _error(408, "body_timeout", f"the request body did not arrive within {cfg.body_timeout_s} s",
                    headers={"Connection": "close"})
    if in_flight.full():
      return in_flight.shed(cfg.retry_after_s)
    # Parsing holds the event loop per JSON object and value (2 MiB of tiny candidates: 210 ms and 78 MiB of
    # heap, bench/body_parse_cost.py): a body with more objects or values than the largest valid request is
    # refused before it (each object, array and item needs one of these bytes)
    max_objects, max_values = json_limits()
    objects, values = json_counts(raw)
    if objects > max_objects or values > max_values:
      return _error(413, "too_large", f"the body holds {objects} JSON objects and {values} values (objects, arrays, "
                    f"items); the largest valid request to the served models holds at most {max_objects} and "
                    f"{max_values} (max_candidates x features)")
    in_flight.count += 1
    try:
      return await _rank(request, raw)
    finally:
      in_flight.count -= 1

  async def _rank(request: Request, raw: bytes) -> Response:
    try:
      body = RankBody.model_validate_json(raw)
    except ValidationError as e:
      return _validation_error(e.errors())
    eng = engine_for(request, body.model)
    req = RankRequest(features=body.features, candidates=[c.features for c in body.candidates],
                      user_id=body.user_id)
    retry = {"Retry-After": str(cfg.retry_after_s)}
    try:
      future = eng.submit(req)
    except RequestError as e:
      return _engine_error(e)
    except (Overloaded, EngineClosed) as e:
      return _error(503, "overloaded", str(e), headers=retry)
    try:
      resp = await asyncio.wait_for(asyncio.wrap_future(future), cfg.request_timeout_s)
    except TimeoutError:
      return _error(503, "overloaded", f"no answer within {cfg.request_timeout_s} s", headers=retry)
    except (Overloaded, EngineClosed) as e:  # raised through the future by a worker process's engine link
      return _error(503, "overloaded", str(e), headers=retry)
    except RequestError as e:
      return _engine_error(e)
    bad = _first_non_finite(resp)
    if bad is not None:  # JSON has no NaN / Infinity: answering them would break strict clients
      return _error(422, "invalid_request", f"candidates[{bad}].features: the model's scores for this candidate are "
                    "not finite (NaN or infinite); its feature values are likely far outside the training range",
                    f"candidates[{bad}].features")
    if resp.user_embedding is not None and resp.user_embedding.age_s >= 0:
      metrics.observe_user_embedding(body.model, resp.user_embedding.age_s)
    return Response(_reply(body.model, resp, [c.item_id for c in body.candidates]), media_type="application/json")

  @app.get("/v1/models", summary="Served models, versions and feature schemas")
  async def models() -> dict:
    def describe_all():  # off the event loop: a worker process asks the engine process (serve.workers)
      return [{"name": n, **registry.engines[n].describe()} for n in registry.names]
    return {"models": await asyncio.to_thread(describe_all)}

  @app.get("/v1/models/{name}/example", responses={404: {"model": ErrorReply}},
           summary="A valid /v1/rank body for this model")
  async def example(name: str, request: Request) -> dict:
    # the engine's layout: candidates are feature dicts; off the event loop, as /v1/models
    ex = await asyncio.to_thread(engine_for(request, name).example_request)
    body = {"model": name, **{k: v for k, v in ex.items() if k != "candidates"}}
    body["candidates"] = [{"item_id": i, "features": c} for i, c in enumerate(ex["candidates"])]
    return body

  @app.get("/healthz", summary="Liveness")
  async def healthz() -> dict:
    return {"status": "ok", "models": registry.names}

  @app.get("/metrics", summary="Prometheus text exposition", response_class=Response)
  async def metrics_page() -> Response:
    http, stats = await asyncio.to_thread(metrics_source)
    return Response(render(http, stats), media_type=CONTENT_TYPE)

  @app.post("/admin/reload", responses={c: {"model": ErrorReply} for c in (401, 403, 404, 409)},
            summary="Hot-swap to the newest checkpoint (all models, or ?model=)")
  async def reload(request: Request, model: Annotated[str | None, Query()] = None) -> dict:
    if admin_token is None:
      raise ApiError(403, "admin_disabled", "admin disabled: start the server with --admin_token or JAXREC_ADMIN_TOKEN")
    given = request.headers.get("authorization", "")
    # Starlette decodes header bytes as latin-1: back to the bytes sent (a UTF-8 token's included)
    if not hmac.compare_digest(given.encode("latin-1"), f"Bearer {admin_token}".encode()):
      raise ApiError(401, "unauthorized", "missing or wrong admin token (send Authorization: Bearer TOKEN)",
                     headers={"WWW-Authenticate": "Bearer"})
    if model is not None:
      engine_for(request, model)
    try:
      out = {"reloaded": await asyncio.to_thread(registry.reload, model)}
    except SwapError as e:
      raise ApiError(409, "swap_failed", f"kept the served checkpoint: {e}") from None
    if gc.get_freeze_count():  # python -m serve froze its heap: collect the replaced model's cycles once
      await asyncio.to_thread(_refreeze)
    return out

  def openapi() -> dict:
    if app.openapi_schema is None:
      schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
      body = RankBody.model_json_schema(ref_template="#/components/schemas/{model}")
      components = schema.setdefault("components", {}).setdefault("schemas", {})
      components.update(body.pop("$defs", {}))
      components["RankBody"] = body
      app.openapi_schema = schema
    return app.openapi_schema

  app.openapi = openapi
  return app


def _refreeze() -> None:
  """Unfreezes the heap, collects it (a replaced model held in reference cycles would otherwise stay
  frozen, with its device buffers, forever) and freezes what is left: one full pause per reload."""
  gc.unfreeze()
  gc.collect()
  gc.freeze()


def _is_json(content_type: str) -> bool:
  """application/json or any +json type, parameters (charset) ignored."""
  media = content_type.split(";", 1)[0].strip().lower()
  return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
