"""A user model's embedding statistics belong to one checkpoint: a resumed run keeps the older ones."""

import dataclasses
import json

import numpy as np
import pytest

from jaxrec.training.user_model import UserModelError, _stats_for, load_user_model, train_user_model
from train import user_model as train_user


def test_each_checkpoint_is_standardised_with_its_own_statistics(tmp_path):
  smoke = train_user.smoke()
  train_user_model(smoke, tmp_path)
  first = json.loads((tmp_path / "embedding_stats.json").read_text())
  first_eval = json.loads((tmp_path / "summary.json").read_text())
  steps = smoke.train.steps
  train_user_model(dataclasses.replace(smoke, train=dataclasses.replace(smoke.train, steps=steps + 5)), tmp_path)
  saved = json.loads((tmp_path / "embedding_stats.json").read_text())
  # the resumed run evaluates the rows of its first start's period (loop.eval_span): same oracle NE
  span = json.loads((tmp_path / "eval_span.json").read_text())["examples"]
  assert span == steps * smoke.data.batch_size
  oracle = [k for k in first_eval if k.startswith("oracle_")]
  assert oracle and all(json.loads((tmp_path / "summary.json").read_text())[k] == first_eval[k] for k in oracle)
  assert saved["step"] == steps + 5 and sorted(saved["by_step"]) == sorted([str(steps), str(steps + 5)])
  assert saved["by_step"][str(steps)]["mean"] == first["mean"]
  newest, older = load_user_model(tmp_path), load_user_model(tmp_path, step=steps)
  assert (newest.step, older.step) == (steps + 5, steps)
  np.testing.assert_allclose(older.mean, first["mean"], rtol=1e-6)
  np.testing.assert_allclose(newest.mean, saved["mean"], rtol=1e-6)
  assert not np.allclose(older.mean, newest.mean)  # the newer run moved them: using them for step 10 was wrong


def test_statistics_lookup():
  legacy = {"mean": [0.0], "std": [1.0], "rows": 3}  # written before steps were recorded
  assert _stats_for(legacy, 7, "wd", "") is legacy
  stats = {"step": 9, "mean": [1.0], "std": [1.0], "rows": 3, "by_step": {"4": {"mean": [2.0]}, "9": {"mean": [1.0]}}}
  assert _stats_for(stats, 4, "wd", "")["mean"] == [2.0]
  with pytest.raises(UserModelError, match=r"no embedding statistics for checkpoint 6 .*known for steps \[4, 9\]"):
    _stats_for(stats, 6, "wd", "")
