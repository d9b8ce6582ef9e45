"""Checkpoints written before TrainState had `fp8` still restore (models without fp8_delayed sites)."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrec.models import DCNv2Config, ModelConfig, build_model
from jaxrec.training import sharding
from jaxrec.training.checkpoint import Checkpointer
from jaxrec.training.state import plan_train_state
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
