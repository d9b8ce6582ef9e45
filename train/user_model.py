"""Train SUM's upstream user model (user tower + mix tower) on every domain of the ads world.

    python -m train.user_model --workdir runs/user_model
    python -m train.user_model --workdir runs/user_model --model.emb_dim 16 --model.num_embeddings 2
    python -m train.ranker --workdir runs/ranker_sum --data.user_model runs/user_model   # downstream
    python -m train.user_model --help          # every config field, its type and default

Its user embeddings (`--model.num_embeddings` x `--model.emb_dim` numbers per user and time) are
what downstream rankers take, frozen, as dense features. A workdir that already holds a
checkpoint is resumed (pass --fresh to start over). Outputs: see jaxrec.training.user_model.
"""

from __future__ import annotations

import dataclasses
import sys

from jaxrec.config import parse_config
from jaxrec.data.errors import DataSpecError
from jaxrec.interrupts import entrypoint, exit_status
from jaxrec.models.user_tower import UserTowerConfig
from jaxrec.training.checkpoint import CheckpointError
from jaxrec.training.loop import LoopConfig, TrainingDivergedError, WorkdirConflictError, interrupted_message
from jaxrec.training.sharding import MeshError
from jaxrec.training.step import OptimConfig
from jaxrec.training.user_model import UserDataConfig, UserModelConfig, train_user_model


@dataclasses.dataclass(frozen=True)
class Args:
  workdir: str = "runs/user_model"
  """directory for checkpoints, user_model.json, metrics.jsonl and summary.json"""
  data: UserDataConfig = UserDataConfig()
  model: UserTowerConfig = UserTowerConfig()
  optim: OptimConfig = OptimConfig()
  train: LoopConfig = UserModelConfig().train
  fresh: bool = False
  """start over: delete this run's checkpoints, metrics and summary in the workdir first"""

  def user_model_config(self) -> UserModelConfig:
    return UserModelConfig(data=self.data, model=self.model, optim=self.optim, train=self.train, fresh=self.fresh)


def smoke() -> UserModelConfig:
  """A config that runs on CPU in seconds (used by tests)."""
  return UserModelConfig(
      data=UserDataConfig(batch_size=128, eval_batch_size=512, eval_examples=2048),
      model=UserTowerConfig(embed_dim=8, user_mlp=(32,), emb_dim=8, mix_mlp=(32,)),
      train=LoopConfig(steps=10, log_every=5, checkpoint_every=5, num_devices=1, progress=False),
  )


@entrypoint
def main(argv: list[str] | None = None) -> int:
  args = parse_config(Args, argv, prog="python -m train.user_model", description=__doc__.split("\n\n")[0])
  try:
    summary = train_user_model(args.user_model_config(), args.workdir)
  except (DataSpecError, WorkdirConflictError, TrainingDivergedError, MeshError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM
    print(interrupted_message(args.workdir), file=sys.stderr)
    return exit_status(e)
  keys = ("steps", "eval_click_ne", "oracle_click_ne", "eval_click_auc", "eval_conversion_ne", "examples_per_sec")
  print("final:", ", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
                            for k in keys if summary.get(k) is not None))
  for d in sorted(k for k in summary["eval"] if k != "all"):
    m = summary["eval"][d]
    print(f"  domain {d}: click NE {m.get('click/ne', float('nan')):.4f} ({int(m['click/count'])} eval rows)")
  print(f"outputs in {args.workdir}: checkpoints/, user_model.json, metrics.jsonl, summary.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
