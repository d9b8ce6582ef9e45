"""SUM study: train the user model, then a small ranker with and without its frozen embedding.

    python -m train.sum_study --workdir runs/sum_study
    python -m train.sum_study --workdir runs/sum_study --seeds 0,1,2     # a third downstream seed
    python -m train.sum_study --help          # every config field, its type and default

Writes WORKDIR/sum_study.json and WORKDIR/sum_study.md (eval NE overall and per domain, without
and with the embedding, for one ranker on every domain and for one ranker per domain), plus the
runs' own workdirs (user_model/, ranker_base/seed*/, ranker_sum/seed*/). See
jaxrec.training.sum_study. The defaults took 4 minutes on the shared 2-core CPU (2026-11-23).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from jaxrec.config import parse_config
from jaxrec.data.adsworld import AdsWorldConfig
from jaxrec.data.errors import DataSpecError
from jaxrec.data.sources import DataConfig
from jaxrec.interrupts import entrypoint
from jaxrec.models import DCNv2Config, ModelConfig
from jaxrec.models.user_tower import UserTowerConfig
from jaxrec.precision.plan import PlanError
from jaxrec.training.checkpoint import CheckpointError
from jaxrec.training.loop import LoopConfig, TrainingDivergedError, WorkdirConflictError
from jaxrec.training.sharding import MeshError
from jaxrec.training.sum_study import SET_BY_STUDY, SumStudyConfig, run_sum_study
from jaxrec.training.user_model import UserDataConfig, UserModelConfig


@dataclasses.dataclass(frozen=True)
class Args(SumStudyConfig):
  workdir: str = "runs/sum_study"
  """directory for sum_study.json, sum_study.md and the three runs"""

  def study_config(self) -> SumStudyConfig:
    return SumStudyConfig(world=self.world, tower=self.tower, ranker=self.ranker, seeds=self.seeds,
                          per_domain=self.per_domain, fresh=self.fresh)


def smoke() -> SumStudyConfig:
  """A config that runs on CPU in well under a minute (used by tests)."""
  base = SumStudyConfig()
  tower = UserModelConfig(
      data=UserDataConfig(batch_size=128, eval_batch_size=1024, eval_examples=4096),
      model=UserTowerConfig(embed_dim=8, user_mlp=(32,), emb_dim=8, mix_mlp=(32,)),
      train=LoopConfig(steps=10, log_every=5, checkpoint_every=10, num_devices=1, progress=False))
  ranker = dataclasses.replace(
      base.ranker,
      data=DataConfig(batch_size=128, eval_batch_size=1024, eval_examples=4096),
      model=ModelConfig(dcnv2=DCNv2Config(embed_dim=4, bottom_mlp=(8,), num_cross=1, top_mlp=(16,))),
      train=LoopConfig(steps=10, log_every=5, checkpoint_every=10, num_devices=1, progress=False))
  return SumStudyConfig(world=AdsWorldConfig.small(), tower=tower, ranker=ranker, seeds=(0,))


@entrypoint
def main(argv: list[str] | None = None) -> int:
  args = parse_config(Args, argv, prog="python -m train.sum_study", description=__doc__.split("\n\n")[0],
                      fixed=SET_BY_STUDY)
  try:
    out = run_sum_study(args.study_config(), args.workdir)
  except (DataSpecError, WorkdirConflictError, TrainingDivergedError, PlanError, MeshError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print((Path(args.workdir) / "sum_study.md").read_text())
  print(f"took {out['seconds']['total']:.0f} s; outputs in {args.workdir}: sum_study.json, sum_study.md, "
        "user_model/, ranker_base/, ranker_sum/")
  return 0


if __name__ == "__main__":
  sys.exit(main())
