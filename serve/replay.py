"""Replay request streams through ERCache's direct and failover tiers (no HTTP).

    python -m train.sum_study --workdir runs/sum_study          # once: a user model + SUM rankers
    python -m serve.replay --workdir runs/replay
    python -m serve.replay --workdir runs/replay --sources adsworld --ttls_s 0,60,300
    python -m serve.replay --workdir runs/replay_gap4 --sources adsworld --requests.gap_short_mean_s 4
    python -m serve.replay --help            # every config field, its type and default

Reports user-model inferences saved, downstream NE (ads world) and served-embedding staleness
against the direct TTL, and fallbacks with and without the failover tier under injected failure
rates, for the ads world (with a SUM ranker) and the access patterns of Taobao UserBehavior and
MovieLens (../shared/data; skipped with a note when absent). --requests.* replays the ads world
under another request process (within-session gaps, session lengths), same users and sessions.
Writes WORKDIR/replay.json, replay.md, replay_ttl.png, replay_staleness.png and replay_failover.png. See
jaxrec.cache.replay_study. The defaults took about 4 minutes on the 2-core CPU (2026-11-23).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from jaxrec.cache.replay_study import ReplayConfig, run_replay_study
from jaxrec.config import parse_config
from jaxrec.data.errors import DataFormatError, DataSpecError
from jaxrec.interrupts import entrypoint
from jaxrec.training.loop import WorkdirConflictError


@dataclasses.dataclass(frozen=True)
class Args(ReplayConfig):
  workdir: str = "runs/replay"
  """directory for replay.json, replay.md and the PNGs"""

  def study_config(self) -> ReplayConfig:
    return ReplayConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ReplayConfig)})


@entrypoint
def main(argv: list[str] | None = None) -> int:
  args = parse_config(Args, argv, prog="python -m serve.replay", description=__doc__.split("\n\n")[0])
  try:
    out = run_replay_study(args.study_config(), args.workdir)
  except (DataSpecError, DataFormatError, FileNotFoundError, WorkdirConflictError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print((Path(args.workdir) / "replay.md").read_text())
  print(f"took {out['seconds']:.0f} s; outputs in {args.workdir}: replay.json, replay.md, replay_ttl.png, "
        "replay_staleness.png, replay_failover.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
