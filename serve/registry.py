"""Which rankers a server holds: training runs found under a folder, one started engine each.

A ranker run is a directory with config.json, schema.json and a non-empty checkpoints/ (what
`python -m train.ranker` leaves). `discover_runs(dir)` serves `dir` itself under its own name when
it is a run, else every run found up to `max_depth` levels below it, named by its relative path
with "/" replaced by "."; user-model workdirs (user_model.json) are not rankers and are skipped.

>>> import tempfile
>>> root = Path(tempfile.mkdtemp())
>>> for run in ("demo", "study/base/seed0", "study/user_model"):
...   (root / run / "checkpoints" / "4").mkdir(parents=True)
...   for name in ("config.json", "schema.json"):
...     _ = (root / run / name).write_text("{}")
>>> _ = (root / "study/user_model/user_model.json").write_text("{}")
>>> sorted(discover_runs(root))
['demo', 'study.base.seed0']
>>> list(discover_runs(root / "demo"))
['demo']
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from jaxrec.config import config_from_dict, config_to_dict
from jaxrec.training.loop import has_checkpoint
from serve.engine import Engine, EngineConfig, open_engine, reload_together

__all__ = ["NoRunsError", "Registry", "UnknownModel", "discover_runs", "engine_configs", "is_ranker_run"]


class NoRunsError(FileNotFoundError):
  """The folder holds no ranker run (the message says where it looked)."""


class UnknownModel(KeyError):
  """No model of that name is served (HTTP 404)."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else "unknown model"


def is_ranker_run(path: Path) -> bool:
  """True for a ranker training run's workdir (see the module docstring)."""
  return ((path / "config.json").is_file() and (path / "schema.json").is_file()
          and not (path / "user_model.json").exists() and has_checkpoint(path))  # not only <step>.orbax-checkpoint-tmp


def discover_runs(root: Path, max_depth: int = 3) -> dict[str, Path]:
  """{model name: run directory} under `root`, sorted by name; raises NoRunsError when there is none,
  ValueError when two runs would get one name (runs "a.b" and "a/b")."""
  root = Path(root)
  if max_depth < 1:
    raise ValueError(f"max_depth must be >= 1, got {max_depth}")
  if not root.is_dir():
    raise NoRunsError(f"{root} is not a directory")
  if is_ranker_run(root):
    return {root.resolve().name: root}
  if (root / "user_model.json").exists():
    raise NoRunsError(f"{root} is a user model's workdir (user_model.json), not a ranker run; train a ranker "
                      f"that consumes it with `python -m train.ranker --data.user_model {root} --workdir DIR` "
                      "and serve DIR")
  runs: dict[str, Path] = {}

  def walk(d: Path, depth: int) -> None:
    for child in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
      if is_ranker_run(child):
        name = child.relative_to(root).as_posix().replace("/", ".")
        if name in runs:
          raise ValueError(f"runs {runs[name]} and {child} would both be served as {name!r}; rename one")
        runs[name] = child
      elif depth < max_depth and not (child / "user_model.json").exists():
        walk(child, depth + 1)

  walk(root, 1)
  if not runs:
    raise NoRunsError(f"{root} holds no ranker run (a directory with config.json, schema.json and a finished "
                      f"checkpoint under checkpoints/, searched {max_depth} levels deep; a run still writing its "
                      "first checkpoint is not one yet); train one with "
                      f"`python -m train.ranker --workdir {root}`")
  return dict(sorted(runs.items()))


def _merge(base: dict, over: dict) -> dict:
  out = dict(base)
  for k, v in over.items():
    out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
  return out


def engine_configs(names: list[str], base: EngineConfig, per_model: str | Path | None) -> dict[str, EngineConfig]:
  """{model name: EngineConfig}: `base` for every model, overridden per model by the JSON file
  `per_model` ({name: {EngineConfig fields, nested as in --engine.*}}), so each user model's
  cache gets its own TTLs and capacities, e.g.

      {"sum.ranker_sum.seed0": {"user_cache": {"direct_ttl_s": 30, "failover_capacity": 1048576}},
       "demo": {"max_candidates": 512}}

  Raises ValueError naming the file and the problem (not JSON, a model not served, a bad field)."""
  out = {n: base for n in names}
  if not per_model:
    return out
  path = Path(per_model)
  try:
    over = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"per-model engine config {path}: {e}") from None
  if not isinstance(over, dict) or not all(isinstance(v, dict) for v in over.values()):
    raise ValueError(f"per-model engine config {path}: expected {{model name: {{field: value}}}}")
  unknown = sorted(set(over) - set(names))
  if unknown:
    raise ValueError(f"per-model engine config {path}: {unknown[0]!r} is not served (models: {names})")
  base_d = config_to_dict(base)
  for name, fields in over.items():
    try:
      out[name] = config_from_dict(EngineConfig, _merge(base_d, fields))
    except (ValueError, TypeError) as e:
      raise ValueError(f"per-model engine config {path}, model {name!r}: {e}") from None
  return out


class Registry:
  """Started engines by model name. `open` loads and starts them; `close` drains them."""

  def __init__(self, engines: dict[str, Engine]):
    self.engines = dict(engines)
    self._reload_lock = threading.Lock()

  @classmethod
  def open(cls, runs: dict[str, Path], cfg: EngineConfig | dict[str, EngineConfig]) -> "Registry":
    """Loads every run with `serve.engine.open_engine` and starts it (compiling its buckets); `cfg` is
    one config for all, or one per model name (`engine_configs`)."""
    engines: dict[str, Engine] = {}
    shared_users: dict = {}  # rankers of one user model share its cache and refresh worker
    try:
      for name, workdir in runs.items():
        engines[name] = open_engine(workdir, cfg[name] if isinstance(cfg, dict) else cfg,
                                    shared_users=shared_users).start()
    except BaseException:
      for eng in engines.values():
        eng.close(drain=False)
      raise
    return cls(engines)

  @property
  def names(self) -> list[str]:
    return list(self.engines)

  def get(self, name: str) -> Engine:
    try:
      return self.engines[name]
    except KeyError:
      raise UnknownModel(f"unknown model {name!r}; served: {self.names}") from None

  def reload(self, name: str | None = None) -> dict[str, dict]:
    """Hot-swaps `name` (default every model) to its newest checkpoint, and the models that share
    its user model with it (a user model is swapped for all its rankers at once:
    `serve.engine.reload_together`); {name: {"version", "user_model_version"}} for every model
    reloaded. All of them switch together after all have compiled; a SwapError switches none. One
    reload at a time; requests keep being served meanwhile."""
    if name is not None:
      self.get(name)  # UnknownModel
    names = self.names if name is None else [name]
    shared = {id(self.engines[n].users) for n in names if self.engines[n].users is not None}
    names = [n for n in self.names if n in names or (self.engines[n].users is not None
                                                    and id(self.engines[n].users) in shared)]
    with self._reload_lock:
      out = reload_together([self.engines[n] for n in names])
    return {n: out[self.engines[n]] for n in names}

  def close(self, drain: bool = True, timeout: float | None = None) -> None:
    for eng in self.engines.values():
      eng.close(drain=drain, timeout=timeout)
