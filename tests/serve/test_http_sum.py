"""serve.app over a SUM ranker (a tiny user tower and a ranker on its embeddings): user_id is required,
responses name the user embedding's source, /metrics shows the cache, sources and staleness."""

import time

import pytest
from fastapi.testclient import TestClient

from jaxrec.training.user_model import train_user_model
from serve.app import HttpConfig, create_app
from serve.engine import EngineConfig
from serve.registry import Registry, discover_runs
from serve.user_embedding import UserCacheConfig
from tests.serve.test_http import SMOKE, _scrape
from train import ranker
from train import user_model as train_user

CACHE = UserCacheConfig(direct_ttl_s=60, failover_ttl_s=3600, direct_capacity=64, failover_capacity=128,
                        refresh_batch=2, refresh_wait_ms=1.0)
SMALL = EngineConfig(buckets=(8, 32), max_rows=32, max_wait_ms=1.0, max_candidates=16, user_cache=CACHE)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
  root = tmp_path_factory.mktemp("http_sum")
  train_user_model(train_user.smoke(), root / "user_model")
  assert ranker.main(["--workdir", str(root / "sum"), "--data.user_model", str(root / "user_model")] + SMOKE) == 0
  runs = discover_runs(root)
  assert list(runs) == ["sum"]  # the user model's workdir is not a ranker
  reg = Registry.open(runs, SMALL)
  with TestClient(create_app(reg, HttpConfig())) as c:
    yield c
  reg.close()


def test_sum_ranker_over_http(client):
  model = client.get("/v1/models").json()["models"][0]
  assert model["name"] == "sum" and model["user_model"]["embedding_dim"] > 0
  example = client.get("/v1/models/sum/example").json()
  assert isinstance(example["user_id"], int)
  r = client.post("/v1/rank", json={k: v for k, v in example.items() if k != "user_id"})
  assert r.status_code == 422 and r.json()["error"]["field"] == "user_id"
  r = client.post("/v1/rank", json={**example, "candidates": [{"item_id": 0, "features": {"user_emb_0": 1.0}}]})
  assert r.status_code == 422 and r.json()["error"]["field"] == "candidates[0].features.user_emb_0"

  first = client.post("/v1/rank", json=example).json()
  assert first["user_embedding_source"] == "fallback" and len(first["candidates"]) == len(example["candidates"])
  assert first["user_embedding_version"] is None and first["user_embedding_age_s"] is None
  deadline = time.monotonic() + 30  # the SOAP worker writes the user's embedding off the request path
  while (reply := client.post("/v1/rank", json=example).json())["user_embedding_source"] != "direct":
    assert reply["user_embedding_source"] in ("fallback", "fresh") and time.monotonic() < deadline
    time.sleep(0.05)
  # which user model wrote the served embedding, and how long ago
  assert reply["user_embedding_version"] == model["user_model"]["version"] and reply["user_embedding_age_s"] >= 0

  m = _scrape(client)
  assert m['jaxrec_user_embedding_served_total{model="sum",source="fallback"}'] >= 1
  assert m['jaxrec_user_embedding_served_total{model="sum",source="direct"}'] >= 1
  assert m['jaxrec_cache_hits_total{model="sum",tier="direct"}'] >= 1
  assert m['jaxrec_cache_misses_total{model="sum",tier="direct"}'] >= 1
  assert 'jaxrec_cache_evictions_total{model="sum",tier="failover"}' in m
  hits = m['jaxrec_cache_hits_total{model="sum",tier="direct"}']
  assert m['jaxrec_cache_inferences_saved_total{model="sum"}'] == hits
  assert m['jaxrec_cache_fallbacks_total{model="sum"}'] >= 1
  assert m['jaxrec_cache_refresh_written_total{model="sum"}'] >= 1
  assert m['jaxrec_user_embedding_age_seconds_count{model="sum"}'] >= 1  # staleness of the served embedding
  assert m['jaxrec_user_model_version{model="sum"}'] > 0
