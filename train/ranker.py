"""Train a DCNv2-style ranker (or the logistic-regression baseline).

    python -m train.ranker --workdir runs/demo
    python -m train.ranker --data.train libfm:frappe/frappe.validation.libfm@train --workdir runs/frappe
    python -m train.ranker --data.train movielens:ml-100k@train --workdir runs/ml100k
    python -m train.ranker --model.kind logreg --workdir runs/lr
    python -m train.ranker --help          # every config field, its type and default

The default trains on the synthetic ads world. A workdir that already holds a checkpoint is
resumed (pass --fresh to start over). Outputs: see jaxrec.training.loop.
"""

from __future__ import annotations

import dataclasses
import sys

from jaxrec.config import parse_config
from jaxrec.data.errors import DataFormatError, DataSpecError
from jaxrec.data.sources import DataConfig
from jaxrec.interrupts import entrypoint, exit_status
from jaxrec.models import ModelConfig
from jaxrec.precision.plan import PlanError
from jaxrec.precision.probe import ProbeConfig
from jaxrec.training.checkpoint import CheckpointError
from jaxrec.training.loop import (LoopConfig, RankerConfig, TrainingDivergedError, WorkdirConflictError,
                                  interrupted_message, train_and_evaluate)
from jaxrec.training.sharding import MeshError
from jaxrec.training.step import OptimConfig


@dataclasses.dataclass(frozen=True)
class Args:
  workdir: str = "runs/ranker"
  """directory for checkpoints, metrics.jsonl, summary.json and curves.png"""
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  optim: OptimConfig = OptimConfig()
  train: LoopConfig = LoopConfig()
  probe: ProbeConfig = ProbeConfig(every=0)
  """LoKA's Probe statistics during training (every N steps; 0 = off); see python -m train.probe"""
  fresh: bool = False
  """start over: delete this run's checkpoints, metrics and summary in the workdir first"""

  def ranker_config(self) -> RankerConfig:
    return RankerConfig(data=self.data, model=self.model, optim=self.optim, train=self.train, probe=self.probe,
                        fresh=self.fresh)


ALIASES = {"steps": "train.steps"}
"""Short spellings: `--steps N` is `--train.steps N`."""


def demo_config() -> RankerConfig:
  """What `make demo` runs: the defaults, i.e. the DCNv2 ranker on the ads world, about 25M
  examples (12000 steps of 2048), a few minutes on a 2-core CPU."""
  return RankerConfig()


def smoke() -> RankerConfig:
  """A config that runs on CPU in seconds (used by tests)."""
  return RankerConfig(
      data=dataclasses.replace(DataConfig(), batch_size=256, eval_batch_size=512, eval_examples=2048),
      train=LoopConfig(steps=20, log_every=5, checkpoint_every=10, progress=False),
  )


@entrypoint
def main(argv: list[str] | None = None) -> int:
  args = parse_config(Args, argv, prog="python -m train.ranker", description=__doc__.split("\n\n")[0],
                      aliases=ALIASES)
  try:
    summary = train_and_evaluate(args.ranker_config(), args.workdir)
  except (DataFormatError, DataSpecError, WorkdirConflictError, PlanError, TrainingDivergedError, MeshError,
          CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM
    print(interrupted_message(args.workdir), file=sys.stderr)
    return exit_status(e)
  keys = ("steps", "eval_ne", "oracle_ne", "ne_over_oracle", "eval_auc", "eval_calibration", "examples_per_sec")
  print("final:", ", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
                            for k in keys if k in summary and summary[k] is not None))
  print(f"outputs in {args.workdir}: checkpoints/, metrics.jsonl, summary.json, curves.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
