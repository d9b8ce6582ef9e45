"""Quality targets of the foundation issue (slow: `make test-all`).

- ads world: the DCNv2 ranker's eval NE within 3% of the oracle NE (the true probabilities),
  while logistic regression on the same features stays at least 5% above it;
- Frappe (seeded 80/20 split of frappe.validation): eval AUC >= 0.96 (0.9659 measured with counting
  features and a frozen embedding table; 0.9529 with learned embeddings and no counts);
- MovieLens-100k (seeded split, label = rating >= 4): eval AUC >= 0.78.
The commands and measured values are in docs/BENCHMARKS.md.
"""

import dataclasses

import pytest

from jaxrec.data.sources import DataConfig
from jaxrec.models import DCNv2Config, ModelConfig
from jaxrec.training.loop import LoopConfig, RankerConfig, train_and_evaluate
from jaxrec.training.step import OptimConfig
from train.ranker import demo_config

pytestmark = pytest.mark.slow


def _loop(steps: int) -> LoopConfig:
  # one device, as the documented runs (tests/conftest.py gives this process 8 host devices)
  return LoopConfig(steps=steps, log_every=max(steps // 10, 1), checkpoint_every=steps, progress=False,
                    num_devices=1)


def _demo() -> RankerConfig:
  cfg = demo_config()
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_devices=1))


def test_adsworld_dcnv2_near_oracle_and_lr_far(tmp_path):
  dcn = train_and_evaluate(_demo(), tmp_path / "dcn")
  print("dcnv2", dcn)
  assert dcn["ne_over_oracle"] < 0.03
  lr_cfg = dataclasses.replace(_demo(), model=ModelConfig(kind="logreg"))
  lr = train_and_evaluate(lr_cfg, tmp_path / "lr")
  print("logreg", lr)
  assert lr["ne_over_oracle"] >= 0.05
  assert lr["oracle_ne"] == pytest.approx(dcn["oracle_ne"])  # same eval rows


# Counting features over the user, the item and the item's context (jaxrec.data.count_features)
FRAPPE_COUNTS = ("user*item", "item", "user", "item*cost", "item*country", "item*city", "item*daytime",
                 "item*weekday", "item*homework", "item*weather", "user*daytime", "user*weekday",
                 "item*isweekend")


def frappe_config(data_dir, counts: bool) -> RankerConfig:
  data = DataConfig(train=f"libfm:{data_dir}/frappe/frappe.validation.libfm@train", batch_size=512,
                    eval_batch_size=4096)
  if not counts:  # embeddings only: 0.9529 (2026-11-23)
    return RankerConfig(
        data=data,
        model=ModelConfig(dcnv2=DCNv2Config(embed_dim=64, top_mlp=(64,), num_cross=2, embedding_init=0.01)),
        optim=OptimConfig(dense_lr=1e-3, embedding_lr=0.5), train=_loop(600))
  # with counts, learned id embeddings only memorise training pairs: the table stays frozen at its
  # init (embedding_lr=0) and the dense layers learn from the counts (docs/BENCHMARKS.md)
  return RankerConfig(
      data=dataclasses.replace(data, count_features=FRAPPE_COUNTS),
      model=ModelConfig(dcnv2=DCNv2Config(embed_dim=64, bottom_mlp=(256, 64), top_mlp=(256, 128), num_cross=2,
                                          embedding_init=0.01)),
      optim=OptimConfig(dense_lr=3e-4, embedding_lr=0.0), train=_loop(1500))


@pytest.fixture(scope="module")
def frappe_summary(tmp_path_factory, data_dir):
  s = train_and_evaluate(frappe_config(data_dir, counts=True), tmp_path_factory.mktemp("frappe"))
  print("frappe", s)
  return s


@pytest.mark.realdata
def test_frappe_auc_target(frappe_summary):
  assert frappe_summary["eval_auc"] >= 0.96  # 0.9659 on 2026-11-23; seeds 0-3: 0.9651-0.9665


@pytest.mark.realdata
def test_movielens_auc(tmp_path, data_dir):
  cfg = RankerConfig(
      data=DataConfig(train=f"movielens:{data_dir}/ml-100k@train", batch_size=512, eval_batch_size=4096),
      model=ModelConfig(dcnv2=DCNv2Config(embed_dim=16, top_mlp=(256, 128), num_cross=2, embedding_init=0.01)),
      optim=OptimConfig(dense_lr=3e-4, embedding_lr=0.02),
      train=_loop(1500))
  s = train_and_evaluate(cfg, tmp_path / "ml100k")
  print("movielens", s)
  assert s["eval_auc"] >= 0.78
