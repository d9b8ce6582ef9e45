"""serve.app over a tiny trained ranker: every endpoint, validation, admin auth, overload, metrics,
run discovery and the CLI's error on a folder without runs."""

import asyncio
import json
import random
import re
import shutil
import threading
import time

import httpx2 as httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve import __main__ as serve_main
from serve.app import HttpConfig, create_app
from serve.engine import EngineConfig
from serve.registry import NoRunsError, Registry, discover_runs
from serve.request import RankRequest
from tests.serve.test_engine import SMALL, SMOKE
from train import ranker

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("http") / "run"
  assert ranker.main(["--workdir", str(wd)] + SMOKE) == 0
  return wd


@pytest.fixture(scope="module")
def registry(run_dir):
  reg = Registry.open({"tiny": run_dir}, SMALL)
  yield reg
  reg.close()


@pytest.fixture(scope="module")
def client(registry):
  with TestClient(create_app(registry, HttpConfig(max_body_bytes=64 << 10), admin_token=TOKEN)) as c:
    yield c


@pytest.fixture(scope="module")
def example(client):
  r = client.get("/v1/models/tiny/example")
  assert r.status_code == 200
  return r.json()


def test_example_round_trip_scores_match_the_engine(client, registry, example):
  assert example["model"] == "tiny" and all(set(c) == {"item_id", "features"} for c in example["candidates"])
  body = {**example, "candidates": [{"item_id": 1000 + i, "features": c["features"]}
                                    for i, c in enumerate(example["candidates"] * 5)]}
  r = client.post("/v1/rank", json=body)
  assert r.status_code == 200, r.text
  out = r.json()
  assert out["model"] == "tiny" and out["model_version"] == 4 and out["user_embedding_source"] is None
  assert [c["item_id"] for c in out["candidates"]] == [1000 + i for i in range(len(body["candidates"]))]
  direct = registry.get("tiny").rank(RankRequest(body["features"], [c["features"] for c in body["candidates"]]),
                                     timeout=30)
  for t in ("click", "conversion"):
    got = np.array([c["scores"][t] for c in out["candidates"]])
    np.testing.assert_allclose(got, direct.scores[t], rtol=0, atol=1e-6)
  # request order is kept: reversed candidates give reversed scores
  rev = client.post("/v1/rank", json={**body, "candidates": body["candidates"][::-1]}).json()
  assert [c["scores"] for c in rev["candidates"]] == [c["scores"] for c in out["candidates"]][::-1]


def test_models_healthz_openapi(client):
  models = client.get("/v1/models").json()["models"]
  assert [m["name"] for m in models] == ["tiny"]
  m = models[0]
  assert m["version"] == 4 and m["objectives"] == ["click", "conversion"] and m["max_candidates"] == 48
  assert "ad_price" in m["dense"] and {"name": "ad_id", "vocab_size": 300, "max_len": 1} in m["sparse"]
  assert client.get("/healthz").json() == {"status": "ok", "models": ["tiny"]}
  spec = client.get("/openapi.json").json()
  assert {"/v1/rank", "/v1/models", "/v1/models/{name}/example", "/healthz", "/metrics",
          "/admin/reload"} <= set(spec["paths"])
  schemas = spec["components"]["schemas"]
  assert {"model", "user_id", "features", "candidates"} == set(schemas["RankBody"]["properties"])
  assert set(schemas["RankReply"]["properties"]) == {"model", "model_version", "user_embedding_source",
                                                     "user_embedding_version", "user_embedding_age_s", "candidates"}
  assert schemas["RankBody"]["properties"]["candidates"]["minItems"] == 1  # the schema says what is refused
  assert client.get("/v1/models/nope/example").status_code == 404


def _cand(**features):
  return {"item_id": 1, "features": features}


@pytest.mark.parametrize("body, status, field, match", [
    ('{"model": "tiny", ', 400, None, "malformed JSON"),
    ('{"model": "tiny", "features": {"user_activity": NaN}, "candidates": [{"item_id": 1}]}', 422,
     "features.user_activity", "finite"),
    ('{"model": "tiny", "candidates": [{"item_id": 1, "features": {"ad_price": -Infinity}}]}', 422,
     "candidates[0].features.ad_price", "finite"),
    ({"model": "tiny", "candidates": [{"item_id": "a"}]}, 422, "candidates[0].item_id", "integer"),
    ({"model": "tiny", "candidates": [{"item_id": 1.5}]}, 422, "candidates[0].item_id", "integer"),
    ({"model": "tiny", "candidates": [_cand(ad_price="1.0")]}, 422, "candidates[0].features.ad_price", "number"),
    ({"model": "tiny", "candidates": [_cand(ad_price=True)]}, 422, "candidates[0].features.ad_price", "number"),
    ({"model": "tiny", "candidates": [_cand(ad_price=10**40)]}, 422, "candidates[0].features.ad_price", "range"),
    ({"model": "tiny", "candidates": [_cand(ad_id=[1.5])]}, 422, "candidates[0].features.ad_id", "integers"),
    ({"model": "tiny", "candidates": [_cand(ad_id=300)]}, 422, "candidates[0].features.ad_id",
     r"id 300 out of range \[0, 299\]"),
    ({"model": "tiny", "candidates": [_cand(), _cand(ad_id=-1)]}, 422, "candidates[1].features.ad_id", "out of range"),
    ({"model": "tiny", "features": {"user_id": 1000}, "candidates": [_cand()]}, 422, "features.user_id",
     "out of range"),
    ({"model": "tiny", "features": {"nope": 1}, "candidates": [_cand()]}, 422, "features.nope", "unknown feature"),
    ({"model": "tiny", "candidates": [_cand()] * 49}, 422, "candidates", "49 candidates, at most 48"),
    ({"model": "tiny", "candidates": []}, 422, "candidates", "at least 1 item"),
    ({"model": "tiny", "user_id": -1, "candidates": [_cand()]}, 422, "user_id", "greater than or equal"),
    ({"candidates": [_cand()]}, 422, "model", "required"),
    ({"model": "tiny", "candidates": [_cand()], "extra": 1}, 422, "extra", "not permitted"),
    ({"model": 7, "candidates": [_cand()]}, 422, "model", "string"),
    ([1, 2], 422, None, "object"),
    ({"model": "nope", "candidates": [_cand()]}, 404, "model", "unknown model 'nope'"),
    # feature names are not parsed back out of the message: spaces and ": " stay in the field
    ({"model": "tiny", "candidates": [_cand(**{"ad price": 1})]}, 422, "candidates[0].features.ad price",
     "^candidates\\[0\\]\\.features\\.ad price: unknown feature"),
    ({"model": "tiny", "features": {"x: y": 1}, "candidates": [_cand()]}, 422, "features.x: y",
     "^features\\.x: y: unknown feature"),
    ({"model": "tiny", "candidates": [_cand(**{"": 1})]}, 422, "candidates[0].features.", "unknown feature"),
])
def test_validation_errors_name_the_field(client, body, status, field, match):
  content = body if isinstance(body, str) else json.dumps(body)
  r = client.post("/v1/rank", content=content, headers={"content-type": "application/json"})
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert err["status"] == status and err["field"] == field and re.search(match, err["message"]), err


def test_content_type_and_size_limits(client, example):
  assert client.post("/v1/rank", content=json.dumps(example)).status_code == 200  # no Content-Type: JSON
  r = client.post("/v1/rank", content=json.dumps(example), headers={"content-type": "text/plain"})
  assert r.status_code == 415 and r.json()["error"]["type"] == "unsupported_media_type"
  r = client.post("/v1/rank", content=b"x" * (65 << 10), headers={"content-type": "application/json"})
  assert r.status_code == 413 and r.json()["error"]["type"] == "too_large"
  assert client.get("/v1/rank").status_code == 405 and client.get("/nope").status_code == 404


def _mutations(example, rng):
  """Malformed bodies: random bytes, truncations, deep nesting, and the example with one value replaced."""
  text = json.dumps(example)
  junk = [None, True, -1, 2**70, 1e308, "x", "", [], {}, [[]], {"a": {}}, [1.5], [-1], ["1"], [None], float("nan")]
  yield b"\xff\xfe\x00garbage"
  yield b"[" * 50_000 + b"]" * 50_000
  yield b'{"model": "tiny", "candidates": [' + b"[" * 5000
  yield b"null"
  for _ in range(60):
    cut = rng.randrange(len(text))
    yield text[:cut].encode()
    body = json.loads(text)
    where = rng.choice(["top", "features", "candidate", "cfeature"])
    if where == "top":
      body[rng.choice(["model", "user_id", "features", "candidates", "junk"])] = rng.choice(junk)
    elif where == "features":
      body["features"][rng.choice(list(body["features"]) + ["zzz"])] = rng.choice(junk)
    elif where == "candidate":
      body["candidates"][rng.randrange(len(body["candidates"]))] = rng.choice(junk)
    else:
      c = body["candidates"][rng.randrange(len(body["candidates"]))]
      key = rng.choice(["item_id", "features"])
      if key == "features" and isinstance(c["features"], dict):
        c["features"][rng.choice(list(c["features"]) + ["zzz"])] = rng.choice(junk)
      else:
        c[key] = rng.choice(junk)
    yield json.dumps(body).encode()  # NaN is written as the NaN literal Python's json accepts


def test_fuzzed_bodies_get_4xx_and_the_server_keeps_serving(client, example):
  codes = {}
  for body in _mutations(example, random.Random(0)):
    r = client.post("/v1/rank", content=body, headers={"content-type": "application/json"})
    codes[r.status_code] = codes.get(r.status_code, 0) + 1
    assert r.status_code < 500, (body[:200], r.text)
    if r.status_code != 200:
      assert set(r.json()["error"]) == {"status", "type", "message", "field"}
  assert codes.get(400, 0) > 0 and codes.get(422, 0) > 0, codes
  assert client.post("/v1/rank", json=example).status_code == 200


def test_admin_reload_needs_the_token(client, registry):
  assert client.post("/admin/reload").status_code == 401
  r = client.post("/admin/reload", headers={"authorization": "Bearer wrong"})
  assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
  r = client.post("/admin/reload", params={"model": "nope"}, headers={"authorization": f"Bearer {TOKEN}"})
  assert r.status_code == 404
  r = client.post("/admin/reload", params={"model": "tiny"}, headers={"authorization": f"Bearer {TOKEN}"})
  assert r.status_code == 200, r.text
  assert r.json()["reloaded"]["tiny"]["version"] == 4
  assert registry.get("tiny").stats()["swaps"] == 1 and registry.get("tiny").stats()["failed_swaps"] == 0
  with TestClient(create_app(registry, HttpConfig())) as no_admin:  # no token configured
    r = no_admin.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 403 and "admin disabled" in r.json()["error"]["message"]


def test_a_non_ascii_admin_token_authenticates(registry):
  """Starlette decodes header bytes as latin-1; comparing their UTF-8 re-encoding with the token's
  UTF-8 bytes refused every non-ASCII token. ?model=nope: past the token check, 404, no reload."""
  with TestClient(create_app(registry, HttpConfig(), admin_token="pässwort")) as c:
    r = c.post("/admin/reload", params={"model": "nope"}, headers={"authorization": "Bearer pässwort".encode()})
    assert r.status_code == 404, r.text
    r = c.post("/admin/reload", params={"model": "nope"}, headers={"authorization": "Bearer passwort".encode()})
    assert r.status_code == 401


def test_reload_collects_a_frozen_heap_and_freezes_it_again(client):
  """python -m serve freezes its heap after start-up; a reload lets the collector see the replaced
  model's reference cycles once (else they stay frozen for good), then freezes again."""
  import gc
  import weakref

  class Node:
    pass

  cycle = Node()
  cycle.self = cycle
  gone = weakref.ref(cycle)
  gc.freeze()
  try:
    del cycle
    assert gone() is not None  # frozen cyclic garbage: no collection reaches it
    r = client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    assert gone() is None and gc.get_freeze_count() > 0
  finally:
    gc.unfreeze()


SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\["\\n])*",?)*\})? '
                    r'(-?[0-9.]+(e[+-]?[0-9]+)?|NaN|[+-]Inf)$')
COMMENT = re.compile(r"^# (HELP [a-zA-Z_:][a-zA-Z0-9_:]* .*|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* "
                     r"(counter|gauge|histogram|summary|untyped))$")


def _scrape(client) -> dict[str, float]:
  r = client.get("/metrics")
  assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
  samples = {}
  for line in r.text.rstrip("\n").split("\n"):
    assert SAMPLE.match(line) or COMMENT.match(line), line
    if not line.startswith("#"):
      name, value = line.rsplit(" ", 1)
      samples[name] = float(value)
  return samples


def test_metrics_exposition_counts_requests(client, example):
  before = _scrape(client)
  assert client.post("/v1/rank", json=example).status_code == 200
  assert client.post("/v1/rank", json={**example, "model": "nope"}).status_code == 404
  after = _scrape(client)
  ok = 'jaxrec_http_requests_total{path="/v1/rank",model="tiny",code="200"}'
  assert after[ok] == before.get(ok, 0) + 1
  unknown = 'jaxrec_http_requests_total{path="/v1/rank",model="",code="404"}'  # client names never become labels
  assert after[unknown] == before.get(unknown, 0) + 1
  assert not any('model="nope"' in k for k in after)
  count = 'jaxrec_http_request_duration_seconds_count{path="/v1/rank",model="tiny"}'
  assert after[count] == before.get(count, 0) + 1
  assert after['jaxrec_http_request_duration_seconds_bucket{path="/v1/rank",model="tiny",le="+Inf"}'] == after[count]
  engine = 'jaxrec_engine_requests_total{model="tiny"}'
  assert after[engine] > before.get(engine, 0)
  assert sum(v for k, v in after.items() if k.startswith("jaxrec_engine_batches_total{")) > 0
  assert after['jaxrec_engine_queue_depth{model="tiny"}'] == 0
  assert after['jaxrec_engine_model_version{model="tiny"}'] == 4
  # requests per batch: every bin up to max_rows from the first scrape on (bins appearing later give a
  # scraper wrong increases), and _sum is the requests themselves, not the bins' bounds
  bins = [k for k in before if k.startswith('jaxrec_engine_batch_requests_bucket{model="tiny"')]
  assert bins == [k for k in after if k.startswith('jaxrec_engine_batch_requests_bucket{model="tiny"')]
  assert len(bins) == (SMALL.max_rows - 1).bit_length() + 2  # 1, 2, 4, ..., the power of two >= max_rows, +Inf
  assert after['jaxrec_engine_batch_requests_sum{model="tiny"}'] == after[engine]
  parser = pytest.importorskip("prometheus_client.parser")  # a second, independent parse
  families = {f.name for f in parser.text_string_to_metric_families(client.get("/metrics").text)}
  assert {"jaxrec_http_requests", "jaxrec_http_request_duration_seconds", "jaxrec_engine_batches"} <= families


def test_a_client_that_hangs_up_before_its_body_is_not_a_server_error(client, registry):
  """A request whose client closes the connection mid-body: counted as 499 (nginx's "client closed
  request"), not a 500 with a traceback."""
  app = client.app
  scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
           "path": "/v1/rank", "raw_path": b"/v1/rank", "query_string": b"", "root_path": "",
           "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
           "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
  parts = [{"type": "http.request", "body": b'{"model":', "more_body": True}, {"type": "http.disconnect"}]

  async def receive():
    return parts.pop(0) if parts else {"type": "http.disconnect"}

  sent = []

  async def send(message):
    sent.append(message)

  before = _scrape(client)
  asyncio.run(app(scope, receive, send))  # raises nothing
  after = _scrape(client)
  closed = 'jaxrec_http_requests_total{path="/v1/rank",model="",code="499"}'
  assert after[closed] == before.get(closed, 0) + 1
  assert not any(k.startswith("jaxrec_http_requests_total") and 'code="500"' in k for k in after)


def test_model_descriptions_never_hold_the_event_loop():
  """With --workers, describe() and example_request() ask the engine process and wait for it: done
  on the event loop they stalled every other request of the worker meanwhile."""
  release = threading.Event()

  class SlowEngine:  # stands in for serve.workers.RemoteEngine waiting on the engine process
    def describe(self):
      release.wait(10)
      return {"version": 1}

    def example_request(self):
      release.wait(10)
      return {"features": {}, "candidates": [{}]}

  app = create_app(Registry({"slow": SlowEngine()}), HttpConfig())

  async def concurrently():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
      slow = [asyncio.create_task(c.get("/v1/models")), asyncio.create_task(c.get("/v1/models/slow/example"))]
      await asyncio.sleep(0.05)
      health = await asyncio.wait_for(c.get("/healthz"), 5)  # answered while both wait
      assert not any(t.done() for t in slow)
      release.set()
      return health, await asyncio.gather(*slow)

  try:
    health, (models, example) = asyncio.run(concurrently())
  finally:
    release.set()
  assert health.status_code == 200 and models.json()["models"] == [{"name": "slow", "version": 1}]
  assert example.json() == {"model": "slow", "features": {}, "candidates": [{"item_id": 0, "features": {}}]}


def _gate(engine):
  """Holds the engine's worker before each batch until the returned event is set."""
  gate, entered, run = threading.Event(), threading.Event(), engine._run

  def held(batch):
    entered.set()
    gate.wait(30)
    run(batch)

  engine._run = held
  return gate, entered


def test_overload_sheds_503_with_retry_after(run_dir, example):
  reg = Registry.open({"tiny": run_dir}, EngineConfig(buckets=(64,), max_rows=64, max_wait_ms=0, max_queue=2,
                                                      max_candidates=48))
  app = create_app(reg, HttpConfig(request_timeout_s=5, retry_after_s=2))
  gate, entered = _gate(reg.get("tiny"))
  body = {**example, "model": "tiny"}

  async def flood():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
      first = asyncio.create_task(c.post("/v1/rank", json=body))
      while not entered.is_set():  # the worker holds the first request
        await asyncio.sleep(0.01)
      rest = [asyncio.create_task(c.post("/v1/rank", json=body)) for _ in range(40)]
      while sum(t.done() for t in rest) < 38:  # two fill the queue, the others are shed at once
        await asyncio.sleep(0.01)
      gate.set()
      return await asyncio.gather(first, *rest), (await c.get("/metrics")).text

  try:
    t0 = time.monotonic()
    answers, metrics = asyncio.run(flood())
    assert time.monotonic() - t0 < 20
  finally:
    reg.close()
  codes = [r.status_code for r in answers]
  assert codes.count(200) == 3 and codes.count(503) == 38, codes
  for r in answers:
    if r.status_code == 503:
      assert r.headers["retry-after"] == "2" and r.json()["error"]["type"] == "overloaded"
  assert 'jaxrec_http_requests_total{path="/v1/rank",model="tiny",code="503"} 38' in metrics


def test_requests_beyond_max_in_flight_are_shed_before_parsing_the_body(run_dir, example):
  reg = Registry.open({"tiny": run_dir}, EngineConfig(buckets=(64,), max_rows=64, max_wait_ms=0, max_queue=16,
                                                      max_candidates=48))
  app = create_app(reg, HttpConfig(max_in_flight=3))
  gate, entered = _gate(reg.get("tiny"))

  async def flood():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
      tasks = [asyncio.create_task(c.post("/v1/rank", json=example)) for _ in range(10)]
      while sum(t.done() for t in tasks) < 7:
        await asyncio.sleep(0.01)
      gate.set()
      return await asyncio.gather(*tasks), (await c.get("/metrics")).text

  try:
    answers, metrics = asyncio.run(flood())
  finally:
    gate.set()
    reg.close()
  assert sorted(r.status_code for r in answers) == [200] * 3 + [503] * 7
  shed = [r for r in answers if r.status_code == 503]
  assert all("max_in_flight" in r.json()["error"]["message"] and r.headers["retry-after"] == "1" for r in shed)
  assert 'jaxrec_http_requests_total{path="/v1/rank",model="",code="503"} 7' in metrics


def _asgi_post(app, chunks: list[bytes], length: int):
  """POST /v1/rank straight to the ASGI app: its body arrives as `chunks`, then nothing more ever
  (a client trickling its body). Returns (status, headers) once the app answers."""
  scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
           "path": "/v1/rank", "raw_path": b"/v1/rank", "query_string": b"", "root_path": "",
           "headers": [(b"content-type", b"application/json"), (b"content-length", str(length).encode())],
           "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
  parts = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
  sent = []

  async def receive():
    if parts:
      return parts.pop(0)
    await asyncio.Event().wait()  # the rest never comes

  async def send(message):
    sent.append(message)

  async def call():
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"])
  return call()


def test_slow_bodies_time_out_408_and_hold_no_in_flight_slot(registry, example):
  """Slowloris: clients that send headers and a byte of body, then nothing. They held every
  max_in_flight slot for good (the body read had no deadline), and every rank request got 503."""
  app = create_app(registry, HttpConfig(max_in_flight=2, body_timeout_s=2.0))

  async def scene():
    slow = [asyncio.create_task(_asgi_post(app, [b"{"], 1000)) for _ in range(3)]
    await asyncio.sleep(0.1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
      ok = await c.post("/v1/rank", json=example)
    assert not any(t.done() for t in slow)
    t0 = time.monotonic()
    answers = await asyncio.wait_for(asyncio.gather(*slow), 10)
    return ok, answers, time.monotonic() - t0

  ok, answers, waited = asyncio.run(scene())
  assert ok.status_code == 200, ok.text
  assert waited < 3
  for status, headers in answers:
    assert status == 408 and headers[b"connection"] == b"close"


def _maximal_body(model: dict) -> dict:
  """The largest valid body for a /v1/models entry: max_candidates candidates, the request and each
  candidate sending every feature, sparse ones with max_len ids."""
  feats = {**{n: 0.5 for n in model["dense"]}, **{f["name"]: [0] * f["max_len"] for f in model["sparse"]}}
  return {"model": model["name"], "features": feats,
          "candidates": [{"item_id": i, "features": feats} for i in range(model["max_candidates"])]}


def test_bodies_of_many_tiny_values_are_refused_before_parsing(client, registry):
  """A 2 MiB body of ~150,000 tiny candidates was parsed whole (hundreds of ms of event loop, ~40x
  its size in heap) before the candidate count was checked: bodies with more JSON values than the
  largest valid request are 413 now, and the largest valid request still passes."""
  from serve.app import RankBody
  model = next(m for m in client.get("/v1/models").json()["models"] if m["name"] == "tiny")
  body = json.dumps(_maximal_body(model)).encode()
  values = body.count(b"{") + body.count(b"[") + body.count(b",")
  limit = registry.get("tiny").encoder().max_json_values()
  assert values <= limit <= values + 70  # an upper bound, and a tight one (64 of slack)
  r = client.post("/v1/rank", content=body, headers={"content-type": "application/json"})
  assert r.status_code == 200, r.text
  tiny = b'{"model": "tiny", "candidates": [' + b",".join([b'{"item_id":0}'] * 3000) + b"]}"
  assert len(tiny) < 64 << 10  # under max_body_bytes: only the value count refuses it
  RankBody.model_validate_json(tiny)  # and it is valid JSON of the right shape
  r = client.post("/v1/rank", content=tiny, headers={"content-type": "application/json"})
  assert r.status_code == 413 and r.json()["error"]["type"] == "too_large", r.text
  assert "3001 JSON objects and 6002 values" in r.json()["error"]["message"]
  objects = body.count(b"{")
  assert objects <= registry.get("tiny").encoder().max_json_objects() <= objects + 8
  # arrays nested in a feature: few objects, many values
  nested = json.dumps({"model": "tiny", "features": {"ad_id": [[]] * 3000}, "candidates": [_cand()]}).encode()
  r = client.post("/v1/rank", content=nested, headers={"content-type": "application/json"})
  counted = f"{nested.count(b'{')} JSON objects and {nested.count(b'{') + nested.count(b'[') + nested.count(b',')} values"
  assert nested.count(b"{") == 4 and r.status_code == 413 and counted in r.json()["error"]["message"], r.text


def test_a_request_outwaiting_its_deadline_is_answered_503(run_dir, example):
  reg = Registry.open({"tiny": run_dir}, EngineConfig(buckets=(64,), max_rows=64, max_wait_ms=0, max_queue=4,
                                                      max_candidates=48))
  gate, entered = _gate(reg.get("tiny"))
  try:
    with TestClient(create_app(reg, HttpConfig(request_timeout_s=0.3))) as c:
      t0 = time.monotonic()
      r = c.post("/v1/rank", json=example)
      assert r.status_code == 503 and "no answer within 0.3 s" in r.json()["error"]["message"]
      assert time.monotonic() - t0 < 5
      gate.set()
      assert c.post("/v1/rank", json=example).status_code == 200
  finally:
    gate.set()
    reg.close()


def test_discover_runs_in_a_folder(run_dir, tmp_path):
  for dest in ("demo", "study/base/seed0", "study/base/seed1"):
    shutil.copytree(run_dir, tmp_path / dest)
  user_model = tmp_path / "study" / "user_model"
  shutil.copytree(run_dir, user_model)
  (user_model / "user_model.json").write_text("{}")
  (tmp_path / "study" / "notes").mkdir()
  (tmp_path / "deep/a/b/c/run").mkdir(parents=True)  # too deep and not a run anyway
  starting = tmp_path / "starting"  # still writing its first checkpoint (or killed while it did): not a run yet
  (starting / "checkpoints" / "4.orbax-checkpoint-tmp").mkdir(parents=True)
  for name in ("config.json", "schema.json"):
    shutil.copy(run_dir / name, starting / name)
  runs = discover_runs(tmp_path)
  assert list(runs) == ["demo", "study.base.seed0", "study.base.seed1"]
  assert runs["study.base.seed1"] == tmp_path / "study/base/seed1"
  assert list(discover_runs(tmp_path / "study" / "base" / "seed0")) == ["seed0"]
  with pytest.raises(NoRunsError, match="holds no ranker run"):
    discover_runs(tmp_path / "deep")
  with pytest.raises(NoRunsError, match="a run still writing its first checkpoint is not one yet"):
    discover_runs(starting)
  with pytest.raises(NoRunsError, match="is a user model's workdir .* --data.user_model"):
    discover_runs(user_model)
  with pytest.raises(ValueError, match="max_depth must be >= 1"):
    discover_runs(tmp_path, 0)
  shutil.copytree(run_dir, tmp_path / "study.base" / "seed0")  # "study.base/seed0" and "study/base/seed0"
  with pytest.raises(ValueError, match="would both be served as 'study.base.seed0'; rename one"):
    discover_runs(tmp_path)


def test_cli_clear_error_on_a_folder_without_runs(tmp_path, capsys):
  assert serve_main.main(["--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err
  assert err.startswith("python -m serve: error: ") and "holds no ranker run" in err
  assert serve_main.main(["--workdir", str(tmp_path / "missing")]) == 2
  assert "is not a directory" in capsys.readouterr().err


def test_non_finite_scores_are_a_422_never_nan_in_the_json(client, example):
  """A finite but extreme feature value (within float32) can make the model's scores NaN: the reply
  must not carry the NaN literal (not JSON: strict clients fail to parse the whole reply)."""
  body = json.loads(json.dumps(example))
  body["candidates"][1]["features"]["ad_price"] = 1e30
  r = client.post("/v1/rank", json=body)
  assert r.status_code == 422, r.text
  json.loads(r.text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
  err = r.json()["error"]
  assert err["field"] == "candidates[1].features" and "not finite" in err["message"]
  assert client.post("/v1/rank", json=example).status_code == 200


# A failed orbax restore closes its asyncio loop while tensorstore reads are still in flight; a read that
# finishes afterwards calls back into the closed loop, which Python reports as an unraisable
# "RuntimeError: Event loop is closed" (orbax-checkpoint 0.12.4 / tensorstore; measured 1 in 240 failed
# restores with three restoring processes on 2 cores). It is harmless (the restore has already failed
# with its own error) and not ours to fix, so only that exact message is ignored here.
@pytest.mark.filterwarnings(r"ignore:Exception ignored in[\s\S]*RuntimeError. Event loop is closed"
                            ":pytest.PytestUnraisableExceptionWarning")
def test_reload_of_an_unreadable_checkpoint_is_409_and_keeps_serving(run_dir, example, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(run_dir, wd)
  reg = Registry.open({"tiny": wd}, SMALL)
  try:
    with TestClient(create_app(reg, HttpConfig(), admin_token=TOKEN)) as c:
      before = c.post("/v1/rank", json=example).json()
      bad = wd / "checkpoints" / "8"  # a newer checkpoint with its array data missing (partial copy, disk error)
      shutil.copytree(wd / "checkpoints" / "4", bad)
      shutil.rmtree(bad / "default" / "d")
      auth = {"authorization": f"Bearer {TOKEN}"}
      r = c.post("/admin/reload", headers=auth)
      assert r.status_code == 409, r.text
      err = r.json()["error"]
      assert err["type"] == "swap_failed" and "cannot load the newest checkpoint" in err["message"]
      assert f"the checkpoint at step 8 under {wd.absolute() / 'checkpoints'} is incomplete or damaged" in err["message"]
      shutil.rmtree(bad)
      (wd / "schema.json").write_text("{}")  # valid JSON of the wrong shape
      r = c.post("/admin/reload", headers=auth)
      assert r.status_code == 409 and "schema.json" in r.json()["error"]["message"], r.text
      assert c.post("/v1/rank", json=example).json() == before  # the served checkpoint stayed
      assert _scrape(c)['jaxrec_engine_failed_swaps_total{model="tiny"}'] == 2
  finally:
    reg.close()


def _truncate_array_data(step_dir, remove: bool) -> None:
  """The largest array-data file of a checkpoint cut to 1000 bytes or removed (a partial copy, a disk
  error): tensorstore's read error reached orbax's callers as a bare Exception."""
  files = [f for f in (step_dir / "default").rglob("*") if f.is_file() and "ocdbt.process_" in str(f)]
  big = max(files, key=lambda f: f.stat().st_size)
  if remove:
    big.unlink()
  else:
    with big.open("r+b") as f:
      f.truncate(1000)


@pytest.mark.parametrize("damage", ["empty step folder", "array data truncated", "array data removed"])
def test_cli_clear_error_on_a_damaged_checkpoint(run_dir, tmp_path, capsys, damage):
  wd = tmp_path / "run"
  shutil.copytree(run_dir, wd)
  if damage == "empty step folder":
    (wd / "checkpoints" / "99").mkdir()  # a step folder left empty (an interrupted copy by hand)
  else:
    shutil.copytree(wd / "checkpoints" / "4", wd / "checkpoints" / "99")
    _truncate_array_data(wd / "checkpoints" / "99", remove=damage.endswith("removed"))
  assert serve_main.main(["--workdir", str(wd), "--port", "0"]) == 2
  err = capsys.readouterr().err
  last = err.splitlines()[-1]
  assert "Traceback" not in err
  assert last.startswith("python -m serve: error: cannot load a run: the checkpoint at step 99 ")
  assert "is incomplete or damaged" in last and f"remove {wd.absolute() / 'checkpoints' / '99'}" in last
  assert "TensorStore(" not in last and len(last) < 700


@pytest.mark.parametrize("name, text", [("config.json", '{"model": 5}'), ("config.json", "[]"),
                                        ("schema.json", "{}"), ("schema.json", '{"dense": [')])
def test_cli_clear_error_on_a_malformed_run(run_dir, tmp_path, capsys, name, text):
  wd = tmp_path / "run"
  shutil.copytree(run_dir, wd)
  (wd / name).write_text(text)
  assert serve_main.main(["--workdir", str(wd), "--port", "0"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.splitlines()[-1].startswith("python -m serve: error: cannot load a run: ")
  assert name in err.splitlines()[-1]
