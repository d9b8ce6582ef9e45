"""The SUM user tower: shapes, determinism, what it reads, that it learns, and its entrypoint."""

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrec.data.adsworld import AdsWorld, AdsWorldConfig
from jaxrec.data.sources import AdsWorldSource
from jaxrec.data.user_history import HistoryConfig, HistorySource
from jaxrec.layers import pool
from jaxrec.models.user_tower import UserTowerConfig, build_user_tower
from jaxrec.training import sharding
from jaxrec.training.state import plan_train_state
from jaxrec.training.step import OptimConfig, batch_shardings, dense_optimizer, make_train_step
from jaxrec.training.user_model import load_user_model

WORLD = AdsWorld(AdsWorldConfig.small())
SOURCE = HistorySource(AdsWorldSource(WORLD, "train", 1024), HistoryConfig(max_clicks=4))
CFG = UserTowerConfig(embed_dim=8, user_mlp=(16,), emb_dim=8, num_embeddings=2, mix_mlp=(16,))


def _batch(index=40, size=64):
  return SOURCE.train_batch(index, size)


def test_shapes_and_determinism():
  b = _batch()
  m = build_user_tower(SOURCE.schema, CFG)
  logits, emb = m(b), m.user_embedding(b)
  assert logits.shape == (64, 2) and logits.dtype == jnp.float32
  assert emb.shape == (64, 16) and m.out_features == 16
  assert np.all(np.isfinite(emb))
  again = build_user_tower(SOURCE.schema, CFG)
  np.testing.assert_array_equal(again.user_embedding(b), emb)
  np.testing.assert_array_equal(again(b), logits)
  other = build_user_tower(SOURCE.schema, dataclasses.replace(CFG, seed=1))
  assert not np.allclose(other.user_embedding(b), emb)  # negative control: the seed matters


def test_embedding_reads_only_user_features():
  b = _batch()
  m = build_user_tower(SOURCE.schema, CFG)
  emb = np.asarray(m.user_embedding(b))
  names = [f.name for f in SOURCE.schema.sparse]
  rng = np.random.default_rng(0)
  sparse = b.sparse.copy()
  for f in ("ad_id", "advertiser_id", "placement", "domain"):  # item / context features
    j = names.index(f)
    sparse[:, j, 0] = rng.integers(0, SOURCE.schema.sparse[j].vocab_size, len(sparse))
  dense = b.dense.copy()
  dense[:, SOURCE.schema.dense.index("ad_price")] += 3.0
  changed = dataclasses.replace(b, sparse=sparse, dense=dense, domain=(b.domain + 1) % 4)
  np.testing.assert_array_equal(m.user_embedding(changed), emb)
  assert not np.allclose(m(changed), m(b))  # ... which the mix tower does read
  hist = b.sparse.copy()  # the history is a user feature
  hist[:, names.index("hist_ads")] = (hist[:, names.index("hist_ads")] + 1) % WORLD.cfg.num_ads
  mask = b.sparse_mask.copy()
  mask[:, names.index("hist_ads")] = True
  assert not np.allclose(m.user_embedding(dataclasses.replace(b, sparse=hist, sparse_mask=mask)), emb)


def test_unknown_user_feature_is_a_clear_error():
  with pytest.raises(ValueError, match="not in the data.s schema"):
    build_user_tower(WORLD.schema, CFG)  # the plain world has no history features


def test_training_lowers_the_loss():
  mesh = sharding.make_mesh(1)
  optim = OptimConfig(dense_lr=3e-3)
  tx = dense_optimizer(optim)
  graphdef, init, _, state_sh = plan_train_state(lambda: build_user_tower(SOURCE.schema, CFG), tx, mesh)
  bsh = batch_shardings(mesh, True)
  step = make_train_step(graphdef, tx, optim, state_sh, bsh)
  batches = [jax.device_put(SOURCE.train_batch(i, 256), bsh) for i in range(8, 12)]
  state = init()
  losses = []
  for epoch in range(10):
    for b in batches:
      state, m = step(state, b)
      losses.append(float(m["loss"]))
  first, last = np.mean(losses[:4]), np.mean(losses[-4:])
  assert np.all(np.isfinite(losses)) and last < 0.9 * first, (first, last)


ENTRY_ARGS = ["--data.batch_size", "128", "--data.eval_batch_size", "512", "--data.eval_examples", "1024",
              "--data.world.num_users", "500", "--data.world.num_ads", "200", "--data.world.num_advertisers", "16",
              "--data.world.num_ad_categories", "8", "--data.world.num_user_segments", "6",
              "--data.world.horizon_days", "7", "--data.history.max_clicks", "4", "--model.embed_dim", "8",
              "--model.user_mlp", "16", "--model.emb_dim", "8", "--model.mix_mlp", "16", "--no-train.progress",
              "--train.num_devices", "1"]


def test_examples_per_sec_leaves_out_eval_time(tmp_path, monkeypatch):
  """It used to time from the first step to the last log, evals included."""
  from jaxrec.training import user_model as um
  from train import user_model
  slow = um.evaluate_by_domain

  def evaluate_slowly(*a, **k):
    time.sleep(2.0)
    return slow(*a, **k)

  monkeypatch.setattr(um, "evaluate_by_domain", evaluate_slowly)
  wd = tmp_path / "um"
  assert user_model.main(["--workdir", str(wd), "--train.steps", "8", "--train.eval_every", "2",
                          "--train.log_every", "8"] + ENTRY_ARGS) == 0
  # 7 timed steps of 128 beside 3 in-loop evals of >= 2 s: counting them would read < 150 examples/s
  assert json.loads((wd / "summary.json").read_text())["examples_per_sec"] > 300


def test_entrypoint_runs_writes_and_restores(tmp_path, capsys):
  from train import user_model
  wd = tmp_path / "um"
  args = ["--workdir", str(wd), "--train.steps", "8", "--train.log_every", "4", "--train.checkpoint_every", "4",
          "--data.batch_size", "128", "--data.eval_batch_size", "512", "--data.eval_examples", "1024",
          "--data.world.num_users", "500", "--data.world.num_ads", "200", "--data.world.num_advertisers", "16",
          "--data.world.num_ad_categories", "8", "--data.world.num_user_segments", "6",
          "--data.world.horizon_days", "7", "--data.history.max_clicks", "4", "--model.embed_dim", "8",
          "--model.user_mlp", "16", "--model.emb_dim", "8", "--model.mix_mlp", "16", "--no-train.progress",
          "--train.num_devices", "1"]
  assert user_model.main(args) == 0
  assert "eval_click_ne=" in capsys.readouterr().out
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["steps"] == 8 and np.isfinite(summary["eval_click_ne"]) and summary["embedding_dim"] == 8
  assert "0" in summary["eval"] and "click/ne" in summary["eval"]["all"]
  losses = [json.loads(l)["train/loss"] for l in (wd / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
  tower = load_user_model(wd)
  assert tower.step == 8 and tower.out_features == 8
  import orbax.checkpoint as ocp
  raw = ocp.StandardCheckpointer().restore((wd / "checkpoints" / "8" / "default").absolute())
  np.testing.assert_array_equal(np.asarray(tower.table), raw["table"])
  flat = jax.tree.leaves(nnx.State(tower.params))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in flat)
  # a second run resumes (nothing left to train) and refuses a different model config
  assert user_model.main(args) == 0
  evals = [json.loads(l)["step"] for l in (wd / "metrics.jsonl").read_text().splitlines() if "eval/click/ne" in l]
  assert evals == [8]  # evaluated again in place of the first run's record
  assert user_model.main(args + ["--model.emb_dim", "4"]) == 2
  assert "different 'model' config" in capsys.readouterr().err
  steps = args.index("--train.steps") + 1
  assert user_model.main(args[:steps] + ["4"] + args[steps + 1:]) == 2
  assert "checkpoint at step 8, past --train.steps 4" in capsys.readouterr().err


def test_embedding_is_linear_plus_mlp_of_mean_pooled_user_features():
  """user embedding = user_linear(x) + user(x), x = [mean-pooled user sparse features, user dense
  features] (module docstring). The history lists here hold 1 to 4 of their ids, so mean and sum
  pooling differ; the other tests would pass with either path dropped or with sum pooling."""
  b = _batch()
  names = [f.name for f in SOURCE.schema.sparse]
  sparse, mask = b.sparse.copy(), b.sparse_mask.copy()
  rng = np.random.default_rng(1)
  for f in ("hist_ads", "hist_advertisers", "hist_categories"):
    j = names.index(f)
    sparse[:, j] = rng.integers(0, SOURCE.schema.sparse[j].vocab_size, sparse[:, j].shape)
    mask[:, j] = np.arange(mask.shape[2])[None, :] < rng.integers(1, mask.shape[2] + 1, (len(mask), 1))
  b = dataclasses.replace(b, sparse=sparse, sparse_mask=mask)
  m = build_user_tower(SOURCE.schema, CFG)
  rows = m.embedding.gather(m.embedding.table[...], m.embedding.row_ids(jnp.asarray(b.sparse)))

  def inputs(combiner):
    pooled = pool(rows, b.sparse_mask, combiner)
    u_sparse = pooled[:, np.array([names.index(f) for f in CFG.user_sparse])].reshape(len(b.dense), -1)
    u_dense = jnp.asarray(b.dense)[:, np.array([SOURCE.schema.dense.index(f) for f in CFG.user_dense])]
    return jnp.concatenate([u_sparse, u_dense.astype(u_sparse.dtype)], axis=1)

  x = inputs("mean")
  np.testing.assert_allclose(m.user_embedding(b), m.user_linear(x) + m.user(x), rtol=1e-5, atol=1e-6)
  # negative controls: each path on its own, and sum pooling, give other embeddings
  for other in (m.user_linear(x), m.user(x), m.user_linear(inputs("sum")) + m.user(inputs("sum"))):
    assert not np.allclose(other, m.user_embedding(b), rtol=1e-3, atol=1e-4)
