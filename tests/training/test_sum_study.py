"""python -m train.sum_study: the smoke config runs end to end and writes its tables."""

import json

import numpy as np

from jaxrec.training.sum_study import run_sum_study
from train import sum_study


def test_smoke_study_writes_both_tables(tmp_path):
  out = run_sum_study(sum_study.smoke(), tmp_path)
  saved = json.loads((tmp_path / "sum_study.json").read_text())
  assert saved["tables"] == json.loads(json.dumps(out["tables"]))
  shared = saved["tables"]["shared"]["click"]
  assert [r["slice"] for r in shared] == ["all", "0", "1", "2", "3"]
  assert np.isfinite(shared[0]["ne_base"]) and np.isfinite(shared[0]["ne_sum"])
  assert shared[0]["eval_rows"] == 4096 and len(shared[0]["ne_change_per_seed"]) == 1
  per_domain = saved["tables"]["per_domain"]["click"]
  assert [r["slice"] for r in per_domain] == ["0", "1", "2", "3"]
  assert all(r["train_examples"] >= 128 for r in per_domain)
  assert per_domain[0]["train_examples"] > per_domain[3]["train_examples"]  # domain 3 is the data-poor one
  md = (tmp_path / "sum_study.md").read_text()
  assert "One ranker per domain" in md and "| all domains | 100% |" in md
  for run in ("user_model", "ranker_base/seed0", "ranker_sum/seed0"):
    assert (tmp_path / run / "summary.json").exists(), run
  ranker_schema = json.loads((tmp_path / "ranker_sum" / "seed0" / "schema.json").read_text())
  assert ranker_schema["dense"][-1] == "user_emb_7"
