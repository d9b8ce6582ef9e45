"""Checkpoints written before TrainState had `fp8` still restore (models without fp8_delayed sites)."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrec.models import DCNv2Config, ModelConfig, build_model
from jaxrec.training import sharding
from jaxrec.training.checkpoint import Checkpointer
from jaxrec.training.state import plan_train_state, table_rows_used
from jaxrec.training.step import OptimConfig, dense_optimizer
from tests.training.test_step import SCHEMA

FIELDS = ("step", "params", "opt_state", "table", "table_acc")


def _plan(precision_plan=""):
  cfg = ModelConfig(dcnv2=DCNv2Config(embed_dim=8, bottom_mlp=(16,), top_mlp=(32,), cross_rank=4),
                    precision_plan=precision_plan)
  return plan_train_state(lambda: build_model(SCHEMA, cfg), dense_optimizer(OptimConfig()), sharding.make_mesh(1))


def _save_old_format(tmp_path, state):
  ck = Checkpointer(tmp_path)
  ck.manager.save(3, args=ocp.args.StandardSave({f: getattr(state, f) for f in FIELDS}))  # no fp8 entry
  ck.close()


def test_old_checkpoint_restores_with_empty_fp8(tmp_path):
  _, init, abstract, sh = _plan()
  state = init()
  _save_old_format(tmp_path, state)
  ck = Checkpointer(tmp_path)
  try:
    back = ck.restore(abstract, sh)
  finally:
    ck.close()
  assert back.fp8 == {}
  for a, b in zip(jax.tree.leaves([getattr(state, f) for f in FIELDS]), jax.tree.leaves([getattr(back, f) for f in FIELDS])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_old_checkpoint_is_refused_for_a_model_that_needs_histories(tmp_path):
  _, init, _, _ = _plan()
  _save_old_format(tmp_path, init())
  _, _, abstract, sh = _plan("uniform:fp8_delayed")
  ck = Checkpointer(tmp_path)
  try:
    with pytest.raises(ValueError, match="fp8"):
      ck.restore(abstract, sh)
  finally:
    ck.close()


def _plan_rows(row_multiple, mesh, **dcnv2):
  cfg = ModelConfig(dcnv2=DCNv2Config(**{"embed_dim": 8, "bottom_mlp": (16,), "top_mlp": (32,), "cross_rank": 4,
                                         "hash_rows": 13, **dcnv2}))
  model_fn = lambda: build_model(SCHEMA, cfg, row_multiple=row_multiple)  # noqa: E731
  return plan_train_state(model_fn, dense_optimizer(OptimConfig()), mesh) + (table_rows_used(model_fn),)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 host devices (tests/conftest.py sets XLA_FLAGS)")
@pytest.mark.parametrize("saved_multiple,devices", [(1, 8), (8, 1)])
def test_a_run_restores_on_another_device_count(tmp_path, saved_multiple, devices):
  """The table's rows are padded to a multiple of the training devices: only that padding differs."""
  _, init, _, _, used = _plan_rows(saved_multiple, sharding.make_mesh(saved_multiple))
  state = init()
  ck = Checkpointer(tmp_path)
  ck.save(3, state)
  ck.close()
  _, _, abstract, sh, _ = _plan_rows(devices, sharding.make_mesh(devices))
  assert used == 93 and abstract.table.shape[0] != state.table.shape[0]  # 93 rows, padded to 96 on 8 devices
  ck = Checkpointer(tmp_path)
  try:
    back = ck.restore(abstract, sh, table_rows_used=used)
  finally:
    ck.close()
  assert back.table.shape == abstract.table.shape and back.table.sharding == sh.table
  np.testing.assert_array_equal(np.asarray(back.table)[:used], np.asarray(state.table)[:used])
  np.testing.assert_array_equal(np.asarray(back.table_acc)[:used], np.asarray(state.table_acc)[:used])
  assert not np.any(np.asarray(back.table)[state.table.shape[0]:])  # added padding rows are zero
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(back.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
  mesh = sharding.make_mesh(1)
  _, init, _, _, used = _plan_rows(8, mesh)
  ck = Checkpointer(tmp_path)
  ck.save(3, init())
  ck.close()
  for other in ({"hash_rows": 20}, {"embed_dim": 4}):  # more feature rows than were saved; another width
    _, _, abstract, sh, used = _plan_rows(1, mesh, **other)
    ck = Checkpointer(tmp_path)
    try:
      with pytest.raises(ValueError, match="written for another model"):
        ck.restore(abstract, sh, table_rows_used=used)
    finally:
      ck.close()
