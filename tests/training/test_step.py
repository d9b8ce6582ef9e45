"""The jitted train step: learns, and gives the same result on 1 and 8 devices."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxrec.data.batch import Schema, SparseFeature, batch_from_numpy
from jaxrec.models import DCNv2Config, ModelConfig, build_model
from jaxrec.training import sharding
from jaxrec.training.losses import weighted_bce
from jaxrec.training.sparse_adagrad import dense_rowwise_adagrad
from jaxrec.training.state import create_train_state, merge_model, merge_state
from jaxrec.training.step import OptimConfig, batch_shardings, dense_optimizer, make_eval_step, make_train_step

SCHEMA = Schema(dense=("d0", "d1", "d2"),
                sparse=(SparseFeature("user", 50), SparseFeature("ad", 30), SparseFeature("tags", None, 3)),
                labels=("click", "conv"))
SMALL = DCNv2Config(embed_dim=8, bottom_mlp=(16,), top_mlp=(32,), cross_rank=4)  # the DCNv2 of these tests


def make_batch(seed: int, b: int = 64):
  """A learnable toy problem: click depends on a user x ad interaction and a dense feature."""
  rng = np.random.default_rng(seed)
  user, ad = rng.integers(0, 50, b), rng.integers(0, 30, b)
  tags = rng.integers(0, 10**6, (b, 3))
  mask = np.ones((b, 3, 3), bool)
  mask[:, :2, 1:] = False  # user and ad are one-hot
  mask[:, 2, 2] = rng.uniform(size=b) > 0.5
  dense = rng.normal(size=(b, 3))
  logit = 2.0 * np.sign(np.sin(user * 1.3 + ad * 0.7)) + dense[:, 0]
  p = 1 / (1 + np.exp(-logit))
  click = rng.uniform(size=b) < p
  conv = click & (rng.uniform(size=b) < 0.3)
  sparse = np.stack([np.stack([user, user * 0, user * 0], 1), np.stack([ad, ad * 0, ad * 0], 1), tags], 1)
  return batch_from_numpy(dense=dense, sparse=sparse, sparse_mask=mask, labels=np.stack([click, conv], 1),
                          weights=np.ones(b), domain=np.zeros(b), timestamp=np.zeros(b), true_prob=None)


def run(num_devices: int, steps: int = 6, kind: str = "dcnv2", embedding_lr: float = 0.1):
  mesh = sharding.make_mesh(num_devices)
  cfg = ModelConfig(kind=kind, dcnv2=SMALL)
  optim = OptimConfig(dense_lr=3e-3, embedding_lr=embedding_lr)
  tx = dense_optimizer(optim)
  graphdef, state, sh = create_train_state(lambda: build_model(SCHEMA, cfg, row_multiple=num_devices), tx, mesh)
  bsh = batch_shardings(mesh, with_truth=False)
  step = make_train_step(graphdef, tx, optim, sh, bsh)
  losses = []
  for i in range(steps):
    state, m = step(state, jax.device_put(make_batch(i % 3), bsh))
    losses.append(float(m["loss"]))
  return np.array(losses), state, graphdef, sh, bsh


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 host devices (tests/conftest.py sets XLA_FLAGS)")
@pytest.mark.parametrize("kind", ["dcnv2", "logreg"])
def test_eight_devices_match_one(kind):
  l1, s1, *_ = run(1, kind=kind)
  l8, s8, *_ = run(8, kind=kind)
  np.testing.assert_allclose(l8, l1, rtol=2e-5, atol=1e-6)
  assert s8.table.sharding.spec[0] == sharding.AXIS  # really row-sharded
  assert len(s8.table.sharding.device_set) == 8
  rows = s1.table.shape[0]
  np.testing.assert_allclose(np.asarray(s8.table)[:rows], np.asarray(s1.table), rtol=1e-4, atol=1e-6)


def test_loss_goes_down_and_eval_gives_probs():
  losses, state, graphdef, sh, bsh = run(1, steps=60)
  assert np.all(np.isfinite(losses))
  assert losses[-3:].mean() < 0.8 * losses[:3].mean()
  probs = np.asarray(make_eval_step(graphdef, sh, bsh)(state, jax.device_put(make_batch(7), bsh)))
  assert probs.shape == (64, 2) and np.all((probs > 0) & (probs < 1))


def test_embedding_lr_zero_freezes_the_table_and_trains_the_rest():
  _, frozen, *_ = run(1, steps=3, embedding_lr=0.0)
  _, learned, *_ = run(1, steps=3)
  init, _, _ = train_steps(OptimConfig(), [])
  np.testing.assert_array_equal(np.asarray(frozen.table), np.asarray(init.table))
  assert not np.array_equal(np.asarray(learned.table), np.asarray(init.table))  # the control moves it
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), frozen.params, init.params)
  assert any(jax.tree.leaves(moved))  # the dense layers still train


def train_steps(optim: OptimConfig, batches):
  """(initial state, state after a train step on each batch under `optim`, graphdef) of the small DCNv2."""
  mesh = sharding.make_mesh(1)
  tx = dense_optimizer(optim)
  graphdef, state, sh = create_train_state(lambda: build_model(SCHEMA, ModelConfig(dcnv2=SMALL), row_multiple=1),
                                           tx, mesh)
  init = jax.device_get(state)  # the step donates `state`
  bsh = batch_shardings(mesh, with_truth=False)
  step = make_train_step(graphdef, tx, optim, sh, bsh)
  for batch in batches:
    state, _ = step(state, jax.device_put(batch, bsh))
  return init, jax.device_get(state), graphdef


def test_embedding_l2_shrinks_the_rows_weighted_examples_looked_up_and_nothing_else():
  """embedding_l2 adds l2 * row to each live lookup's gradient: with a penalty far above the loss
  gradient every row a weighted example looked up moves toward zero; rows looked up only by
  zero-weight examples (or padding), and rows never looked up, keep their values."""
  batch = make_batch(0)
  weights = np.ones(64, np.float32)
  weights[32:] = 0.0
  batch = batch.replace(weights=jax.numpy.asarray(weights))
  init, after, graphdef = train_steps(OptimConfig(dense_lr=3e-3, embedding_lr=0.1, embedding_l2=1e3), [batch])
  ids = np.asarray(merge_state(graphdef, jax.device_put(init)).embedding.row_ids(batch.sparse))
  mask = np.asarray(batch.sparse_mask)
  live = set(ids[:32][mask[:32]].tolist())
  assert set(ids[32:][mask[32:]].tolist()) - live  # some rows only zero-weight examples look up
  before, now = np.asarray(init.table), np.asarray(after.table)
  assert set(np.flatnonzero(np.any(now != before, axis=1)).tolist()) == live
  live = sorted(live)
  assert np.all(np.linalg.norm(now[live], axis=1) < 0.9 * np.linalg.norm(before[live], axis=1))


def test_weight_decay_is_decoupled_and_scaled_by_the_learning_rate():
  """AdamW: with weight_decay w a step moves each dense parameter p by a further -dense_lr * w * p
  from where the same step without decay takes it (the Adam part is the same)."""
  batch = make_batch(0)
  init, plain, _ = train_steps(OptimConfig(dense_lr=3e-3, embedding_lr=0.1), [batch])
  _, decayed, _ = train_steps(OptimConfig(dense_lr=3e-3, embedding_lr=0.1, weight_decay=0.5), [batch])
  for p0, a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(plain.params), jax.tree.leaves(decayed.params)):
    np.testing.assert_allclose(np.asarray(b) - np.asarray(a), -3e-3 * 0.5 * np.asarray(p0), rtol=1e-3, atol=1e-7)
  assert any(np.any(np.asarray(p) != 0) for p in jax.tree.leaves(init.params))  # not a trivial 0 == 0


def test_warmup_starts_the_dense_learning_rate_at_zero():
  """warmup_steps ramps the dense learning rate linearly from 0: the first step leaves the dense
  parameters where they were (the embedding table, on Adagrad, still moves); without warm-up it moves them."""
  batch = make_batch(0)
  init, warm, _ = train_steps(OptimConfig(dense_lr=3e-3, embedding_lr=0.1, warmup_steps=4), [batch])
  _, cold, _ = train_steps(OptimConfig(dense_lr=3e-3, embedding_lr=0.1), [batch])
  for p0, w in zip(jax.tree.leaves(init.params), jax.tree.leaves(warm.params)):
    np.testing.assert_array_equal(np.asarray(w), np.asarray(p0))
  assert any(np.any(np.asarray(c) != np.asarray(p0)) for p0, c in zip(jax.tree.leaves(init.params),
                                                                       jax.tree.leaves(cold.params)))
  assert np.any(np.asarray(warm.table) != np.asarray(init.table))


def test_two_steps_match_a_hand_written_adamw_and_rowwise_adagrad():
  """The step against an independent reference: the loss differentiated through the whole model
  (a dense [R, D] table gradient, not the gathered rows'), AdamW written out (bias-corrected moments
  with this config's b1, b2, decoupled decay) and row-wise Adagrad on the dense gradient with this
  config's eps, over two steps so that the moments and the accumulator carry. Settings away from
  the defaults (b1, b2, eps, l2, decay, half the examples at weight 0), so a swapped or ignored one shows."""
  optim = OptimConfig(dense_lr=3e-3, embedding_lr=0.1, embedding_l2=0.05, weight_decay=0.2, adam_b1=0.7,
                      adam_b2=0.9, adagrad_eps=0.05)
  weights = np.ones(64, np.float32)
  weights[::2] = 0.0
  batches = [make_batch(t).replace(weights=jax.numpy.asarray(weights)) for t in (1, 2)]
  init, got, graphdef = train_steps(optim, batches)
  params = jax.tree.map(np.asarray, init.params)
  table = np.asarray(init.table)
  acc = np.zeros(table.shape[0], np.float32)
  mom = jax.tree.map(np.zeros_like, params)
  var = jax.tree.map(np.zeros_like, params)
  for t, batch in enumerate(batches, 1):

    def loss(p, tab, batch=batch):
      return weighted_bce(merge_model(graphdef, p, tab)(batch), batch.labels, batch.weights)

    g_p, g_tab = jax.grad(loss, argnums=(0, 1))(params, table)
    ids = np.asarray(merge_model(graphdef, params, table).embedding.row_ids(batch.sparse))
    live = np.asarray(batch.sparse_mask) & (weights > 0)[:, None, None]
    lookups = np.zeros(table.shape[0], np.float32)
    np.add.at(lookups, ids[live], 1.0)
    g_tab = np.asarray(g_tab) + optim.embedding_l2 * lookups[:, None] * table  # l2 * row per live lookup
    table, acc = map(np.asarray, dense_rowwise_adagrad(table, acc, g_tab, lr=optim.embedding_lr, eps=optim.adagrad_eps))
    b1, b2, lr = optim.adam_b1, optim.adam_b2, optim.dense_lr
    mom = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * np.asarray(g), mom, g_p)
    var = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * np.asarray(g) ** 2, var, g_p)
    params = jax.tree.map(lambda p, m, v: p - lr * ((m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + 1e-8)
                                                     + optim.weight_decay * p), params, mom, var)
  np.testing.assert_allclose(np.asarray(got.table), table, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got.table_acc), acc, rtol=1e-5, atol=1e-9)
  for name, a, b in zip(jax.tree_util.tree_leaves_with_path(got.params), jax.tree.leaves(got.params),
                        jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6, err_msg=str(name[0]))
  assert np.count_nonzero(acc) > 0 and int(got.step) == 2


def test_negative_embedding_lr_is_refused():
  with pytest.raises(ValueError, match="embedding_lr >= 0"):
    OptimConfig(embedding_lr=-0.1)


def test_batch_not_divisible_by_devices_is_a_clear_error():
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    sharding.check_batch_size(100, sharding.make_mesh(8))


def run_delayed(num_devices: int, steps: int):
  mesh = sharding.make_mesh(num_devices)
  cfg = ModelConfig(dcnv2=dataclasses.replace(SMALL, compute_dtype="bfloat16"), precision_plan="uniform:fp8_delayed")
  optim = OptimConfig(dense_lr=3e-3, embedding_lr=0.1)
  tx = dense_optimizer(optim)
  graphdef, state, sh = create_train_state(lambda: build_model(SCHEMA, cfg, row_multiple=num_devices), tx, mesh)
  bsh = batch_shardings(mesh, with_truth=False)
  step = make_train_step(graphdef, tx, optim, sh, bsh)
  init_fp8 = jax.device_get(state.fp8)
  losses = []
  for i in range(steps):
    state, m = step(state, jax.device_put(make_batch(i % 3), bsh))
    losses.append(float(m["loss"]))
  return np.array(losses), state, init_fp8, graphdef, sh, bsh


def test_delayed_scaling_histories_live_in_the_state_and_fill_one_column_per_step():
  losses, state, init_fp8, graphdef, sh, bsh = run_delayed(1, steps=40)
  hists = jax.tree.leaves(state.fp8)
  assert len(hists) == len(jax.tree.leaves(init_fp8)) > 0 and all(not np.any(h) for h in jax.tree.leaves(init_fp8))
  assert "fp8_meta" not in str(jax.tree_util.tree_structure(state.params))  # no optimizer on histories
  for h in hists:  # [3, 1024]: x, w, dy amaxes of the last 40 steps, newest first
    h = np.asarray(h)
    assert h.shape == (3, 1024) and np.all(h[:, :40] > 0) and not np.any(h[:, 40:])
  assert np.all(np.isfinite(losses)) and losses[-3:].mean() < 0.8 * losses[:3].mean()
  probs = np.asarray(make_eval_step(graphdef, sh, bsh)(state, jax.device_put(make_batch(7), bsh)))
  assert probs.shape == (64, 2) and np.all((probs > 0) & (probs < 1))


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 host devices (tests/conftest.py sets XLA_FLAGS)")
def test_delayed_scaling_eight_devices_match_one():
  """amaxes are global over the sharded batch, so 8 devices record the histories 1 device does."""
  l1, s1, *_ = run_delayed(1, steps=4)
  l8, s8, *_ = run_delayed(8, steps=4)
  np.testing.assert_allclose(l8, l1, rtol=1e-3, atol=1e-5)
  for a, b in zip(jax.tree.leaves(s8.fp8), jax.tree.leaves(s1.fp8)):
    np.testing.assert_allclose(np.asarray(a)[:, :4], np.asarray(b)[:, :4], rtol=1e-2)
