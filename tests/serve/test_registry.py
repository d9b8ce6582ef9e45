"""serve.registry: per-model engine configs, and Registry.open handing each model its own."""

import json

import pytest

from jaxrec.config import parse_config
from serve import registry as registry_mod
from serve.__main__ import ServeConfig, _url
from serve.engine import EngineConfig
from serve.registry import Registry, engine_configs


def test_per_model_overrides_merge_over_the_base(tmp_path):
  path = tmp_path / "per_model.json"
  path.write_text(json.dumps({"a": {"user_cache": {"direct_ttl_s": 30}}, "b": {"max_candidates": 16}}))
  base = EngineConfig(max_wait_ms=1.0)
  cfgs = engine_configs(["a", "b", "c"], base, path)
  assert cfgs["c"] == base
  assert cfgs["a"].user_cache.direct_ttl_s == 30 and cfgs["a"].max_wait_ms == 1.0
  assert cfgs["a"].user_cache.failover_ttl_s == base.user_cache.failover_ttl_s  # untouched nested fields kept
  assert cfgs["b"].max_candidates == 16 and cfgs["b"].user_cache == base.user_cache
  assert engine_configs(["a"], base, "") == {"a": base}


@pytest.mark.parametrize("content, match", [
    ("{not json", "per-model engine config"),
    ('{"zzz": {"max_wait_ms": 1}}', "'zzz' is not served"),
    ('{"a": {"user_cache": {"direct_ttl": 3}}}', "unknown field user_cache.direct_ttl; did you mean user_cache.direct_ttl_s"),
    ('{"a": {"max_candidates": 100000}}', "model 'a'"),
    ('{"a": 3}', "expected"),
])
def test_bad_per_model_files_name_the_problem(tmp_path, content, match):
  path = tmp_path / "per_model.json"
  path.write_text(content)
  with pytest.raises(ValueError, match=match):
    engine_configs(["a"], EngineConfig(), path)


def test_open_gives_each_model_its_config(monkeypatch, tmp_path):
  seen, shared_dicts = {}, []

  class FakeEngine:
    def __init__(self, workdir, cfg, shared_users):
      seen[workdir.name] = cfg
      shared_dicts.append(shared_users)

    def start(self):
      return self

  monkeypatch.setattr(registry_mod, "open_engine", FakeEngine)
  cfgs = {"a": EngineConfig(max_wait_ms=1.0), "b": EngineConfig(max_wait_ms=3.0)}
  reg = Registry.open({"a": tmp_path / "a", "b": tmp_path / "b"}, cfgs)
  assert reg.names == ["a", "b"] and seen == {"a": cfgs["a"], "b": cfgs["b"]}
  assert shared_dicts[0] is shared_dicts[1]  # one user-model table for the whole server


def test_cli_refuses_a_bad_per_model_file(tmp_path, capsys):
  from serve.__main__ import main
  run = tmp_path / "demo"
  (run / "checkpoints" / "4").mkdir(parents=True)
  for name in ("config.json", "schema.json"):
    (run / name).write_text("{}")
  (tmp_path / "pm.json").write_text('{"other": {}}')
  assert main(["--workdir", str(run), "--engine_per_model", str(tmp_path / "pm.json")]) == 2
  err = capsys.readouterr().err
  assert "'other' is not served (models: ['demo'])" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--engine.max_wait_ms", "1e13"], "need 0 <= max_wait_ms <= 60000.0"),
    (["--engine.max_wait_ms", "inf"], "--engine.max_wait_ms: expected float (a finite number)"),
    (["--engine.user_cache.refresh_wait_ms", "1e13"], "refresh_wait_ms must be in [0, 60000.0]"),
    (["--engine.user_cache.sync_deadline_ms", "61000"], "sync_deadline_ms must be in (0, 60000.0]"),
    (["--engine.user_cache.refresh_batch", "0"], "refresh_batch must be >= 1, got 0"),
    (["--engine.user_cache.refresh_queue", "0"], "refresh_queue must be >= 1, got 0"),
    (["--engine.user_cache.direct_capacity", "0"], "direct_capacity must be >= 1, got 0"),
    (["--engine.user_cache.stabilize_m", "0"], "stabilize_m must be >= 1, got 0"),
    (["--engine.user_cache.direct_ttl_s", "-1"], "need 0 <= direct_ttl_s <= failover_ttl_s, got -1 and 86400"),
    (["--engine.user_cache.failover_ttl_s", "10"], "need 0 <= direct_ttl_s <= failover_ttl_s, got 60 and 10"),
    (["--engine.user_cache.failover_capacity", "4", "--engine.user_cache.direct_capacity", "64"],
     "failover_capacity (4) must be >= direct_capacity (64)"),
    (["--max_depth", "0"], "max_depth must be >= 1, got 0"),
])
def test_bad_server_settings_are_refused_before_anything_loads(args, message, capsys):
  """Every model's settings are checked, served SUM ranker or not: a wait of 1e13 ms or inf once passed
  and then killed the batcher thread (time_t overflow) behind a /healthz that still said ok."""
  with pytest.raises(SystemExit) as info:
    parse_config(ServeConfig, args, prog="python -m serve", description="")
  err = capsys.readouterr().err
  assert info.value.code == 2 and message in err and err.count("\n") == 1


def test_announced_urls_bracket_ipv6_hosts():
  assert _url("::1", 8000) == "http://[::1]:8000" and _url("127.0.0.1", 80) == "http://127.0.0.1:80"
