"""Data specs `FORMAT:PATH[@SPLIT]` -> batch sources.

    adsworld[:STREAM]          the synthetic ads world; STREAM names an independent example
                               stream (default "train"; use "eval" for evaluation): any name of
                               letters, digits, "_", "-", ".", and no @SPLIT
    criteo:PATH                Criteo Kaggle TSV (label, 13 ints, 26 hex categoricals)
    libfm:PATH                 libFM lines (Frappe)
    movielens:DIR              MovieLens-100k folder (u.data, u.user, u.item)
    aliccp:PATH                Ali-CCP CSV (click, purchase)
    aliexpress:PATH            AliExpress CSV (click, conversion)
    taobao:PATH                Taobao UserBehavior events (one example per page view; cart_or_fav, buy)

SPLIT is `train` or `eval` for a split of one file (`DataConfig.eval_fraction`; seeded random by
`DataConfig.split_seed`, or by time with `DataConfig.split_by="time"`), or `all` (the default). A
relative PATH that does not exist is also looked up under the shared data folder
(`jaxrec.data.paths.default_data_dir()`), so
`libfm:frappe/frappe.validation.libfm@train` works from the repository root.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Callable, Iterator, Literal

from jaxrec.data.adsworld import AdsWorld, AdsWorldConfig
from jaxrec.data.batch import Batch
from jaxrec.data.count_features import add_count_features
from jaxrec.data.errors import DataFormatError, DataSpecError
from jaxrec.data.examples import Examples
from jaxrec.data.paths import DATA_DIR_ENV, default_data_dir
from jaxrec.data.pipeline import BatchSource, ExamplesSource
from jaxrec.data import readers

SPLITS = ("train", "eval", "all")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  train: str = "adsworld:train"
  """training data as FORMAT:PATH[@SPLIT] (formats: adsworld, criteo, libfm, movielens, aliccp, aliexpress, taobao)"""
  eval: str = ""
  """eval data as FORMAT:PATH[@SPLIT]; empty = adsworld:eval for the ads world, or the @eval split of --data.train"""
  batch_size: int = 2048
  """global training batch size (a multiple of the device count)"""
  eval_batch_size: int = 4096
  """eval batch size (the last batch is padded with weight-0 rows)"""
  eval_examples: int = 200_000
  """how many examples an ads-world eval stream holds, rounded up to whole eval batches (real data: the
  whole eval split)"""
  eval_fraction: float = 0.2
  """fraction of rows in the @eval split of a file"""
  split_seed: int = 0
  """seed of the train/eval split of a file"""
  split_by: Literal["random", "time"] = "random"
  """how a file's @train/@eval split is drawn: "random" (seeded by split_seed) or "time" (@eval = the
  latest eval_fraction of rows by timestamp). Taobao's labels look ahead (a later cart or buy), so it
  takes "time" only, and its training views are labelled with the events before the split's boundary
  alone (readers.taobao_time_split)"""
  shuffle_seed: int = 0
  """seed of the per-epoch shuffle of real-data training rows"""
  world: AdsWorldConfig = AdsWorldConfig()
  """the synthetic ads world's knobs (see jaxrec.data.adsworld.AdsWorldConfig)"""
  count_features: tuple[str, ...] = ()
  """counting features to add (real data only): crosses of one-hot sparse features, e.g.
  user*item,item; each adds log1p(positive, negative training counts) per objective as dense
  features, out-of-fold on training rows (jaxrec.data.count_features)"""
  count_folds: int = 5
  """folds of the out-of-fold training counts"""
  user_model: str = ""
  """workdir of a user model (python -m train.user_model) whose frozen user embeddings are appended
  to every row as dense features user_emb_* (ads world only; jaxrec.data.user_embedding); empty = none"""

  def __post_init__(self):
    for name in ("batch_size", "eval_batch_size", "eval_examples"):
      if getattr(self, name) < 1:
        raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
    if not 0.0 < self.eval_fraction < 1.0:
      raise ValueError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}")
    if self.count_features and self.count_folds < 2:
      raise ValueError(f"data.count_folds must be >= 2, got {self.count_folds}")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  format: str
  path: str
  split: str

  def __str__(self) -> str:
    return f"{self.format}:{self.path}@{self.split}"


def _load_taobao(path: str) -> Examples:
  return readers.taobao_examples(readers.read_taobao_events(path))


READERS: dict[str, Callable[[str], Examples]] = {
    "criteo": readers.read_criteo,
    "libfm": readers.read_libfm,
    "movielens": readers.read_movielens,
    "aliccp": readers.read_aliccp,
    "aliexpress": readers.read_aliexpress,
    "taobao": _load_taobao,
}
FORMATS = ("adsworld",) + tuple(READERS)


def parse_spec(spec: str) -> DataSpec:
  """Parses FORMAT:PATH[@SPLIT]; raises DataSpecError with the accepted forms."""
  fmt, _, rest = spec.partition(":")
  fmt = fmt.strip().lower()
  if fmt not in FORMATS:
    raise DataSpecError(f"data spec {spec!r}: unknown format {fmt!r}; formats: {', '.join(FORMATS)} "
                        "(write FORMAT:PATH[@SPLIT], e.g. libfm:frappe/frappe.validation.libfm@train)")
  if fmt == "adsworld":
    return DataSpec("adsworld", check_stream_name(rest or "train", f"data spec {spec!r}"), "all")
  path, at, split = rest.rpartition("@") if "@" in rest else (rest, "", "all")
  if not path:
    raise DataSpecError(f"data spec {spec!r}: format {fmt} needs a path, as {fmt}:PATH[@SPLIT]")
  if split not in SPLITS:
    raise DataSpecError(f"data spec {spec!r}: split must be one of {SPLITS}, got {split!r}")
  return DataSpec(fmt, path, split)


def check_stream_name(name: str, what: str) -> str:
  """`name` if it can name an ads-world stream, else DataSpecError: each name (train, eval, eval2, ...)
  is its own seeded request log, so a stray "@train" or "libfm:..." would silently name a new one."""
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
    raise DataSpecError(f"{what}: {name!r} is not an ads-world stream name (letters, digits, '_', '-', '.'; each "
                        "name, e.g. train or eval, is its own seeded request log, so the ads world takes no @SPLIT "
                        "and no file)")
  return name


def resolve_path(path: str) -> Path:
  p = Path(path).expanduser()
  if p.exists() or p.is_absolute():
    return p
  shared = default_data_dir() / p
  return shared if shared.exists() else p


@functools.lru_cache(maxsize=8)
def _read(fmt: str, path: Path) -> Examples:
  return READERS[fmt](str(path))


@functools.lru_cache(maxsize=4)
def _taobao_time_split(path: Path, eval_fraction: float) -> tuple[Examples, Examples]:
  return readers.taobao_time_split(readers.read_taobao_events(path), eval_fraction)


class AdsWorldSource:
  """One named example stream of the ads world; batch i is generated on demand.

  The world's streams run forward in world time (batch i holds examples [i B, (i + 1) B) of a
  time-ordered request log). Evaluation should cover the period training saw, so `eval_batches`
  spreads its `eval_examples` evenly over the first `span_examples` of the stream (the training
  run's steps x batch size) instead of taking only its first minutes.
  """

  def __init__(self, world: AdsWorld, stream: str, eval_examples: int, span_examples: int = 0):
    self.world, self.stream, self.eval_examples = world, stream, eval_examples
    self.span_examples = span_examples
    self.schema = world.schema
    self.has_truth = True

  def train_batch(self, index: int, batch_size: int) -> Batch:
    return self.world.batch(self.stream, index, batch_size)

  def _eval_indices(self, batch_size: int) -> list[int]:
    n = -(-self.eval_examples // batch_size)
    slots = max(self.span_examples // batch_size, n)
    return [(k * slots) // n for k in range(n)]

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    for i in self._eval_indices(batch_size):
      yield self.world.batch(self.stream, i, batch_size)

  def eval_examples_read(self, batch_size: int) -> int:
    """How far into the stream `eval_batches(batch_size)` reads, in examples."""
    return (self._eval_indices(batch_size)[-1] + 1) * batch_size


def open_examples(spec: DataSpec, cfg: DataConfig) -> Examples:
  """The in-memory rows of a file spec (after its @train/@eval split)."""
  path = resolve_path(spec.path)
  if not path.exists() and not Path(spec.path).expanduser().is_absolute():
    raise DataFormatError(spec.path, None, None, f"no such file here ({Path.cwd()}) or in the real-data folder "
                          f"{default_data_dir()} (set {DATA_DIR_ENV} to look elsewhere)")
  if spec.split != "all" and spec.format == "taobao":
    if cfg.split_by != "time":
      raise DataSpecError(f"data spec {spec.path}@{spec.split}: taobao's labels look ahead (a later cart or buy of "
                          "the viewed item), so a random @train/@eval split puts the eval views' outcomes into "
                          "training labels (docs/BENCHMARKS.md); pass --data.split_by time")
    train, evl = _taobao_time_split(path, cfg.eval_fraction)  # training labels as known at the boundary
    return train if spec.split == "train" else evl
  examples = _read(spec.format, path)
  if spec.split != "all":
    if cfg.split_by == "time":
      train, evl = examples.time_split(cfg.eval_fraction)
    else:
      train, evl = examples.split(cfg.eval_fraction, cfg.split_seed)
    examples = train if spec.split == "train" else evl
  return examples


def open_source(spec: DataSpec, cfg: DataConfig, span_examples: int = 0) -> BatchSource:
  """A batch source for one spec; `span_examples` is the training run's length in examples."""
  if spec.format == "adsworld":
    return AdsWorldSource(_world(cfg.world), spec.path, cfg.eval_examples, span_examples)
  return ExamplesSource(open_examples(spec, cfg), seed=cfg.shuffle_seed)


@functools.lru_cache(maxsize=4)
def _world(cfg: AdsWorldConfig) -> AdsWorld:
  return AdsWorld(cfg)


def train_eval_specs(cfg: DataConfig) -> tuple[DataSpec, DataSpec]:
  """The training and eval specs of a DataConfig, the eval one defaulted; DataSpecError when they are
  the same data or share rows. Reads no data."""
  train_spec = parse_spec(cfg.train)
  if cfg.eval:
    eval_spec = parse_spec(cfg.eval)
  elif train_spec.format == "adsworld":
    eval_spec = DataSpec("adsworld", "eval", "all")
  elif train_spec.split == "train":
    eval_spec = dataclasses.replace(train_spec, split="eval")
  else:
    raise DataSpecError(f"no eval data: pass --data.eval FORMAT:PATH[@SPLIT], or train on "
                        f"{train_spec.format}:{train_spec.path}@train to hold out a seeded split")
  if train_spec == eval_spec:
    raise DataSpecError(f"--data.train and --data.eval are the same data ({train_spec}); "
                        "evaluating on training rows would overstate quality")
  if share_rows(train_spec, eval_spec):
    raise DataSpecError(f"--data.train {train_spec} and --data.eval {eval_spec} share rows (the same data; only "
                        "its @train and @eval splits are disjoint); evaluating on training rows would overstate "
                        "quality")
  return train_spec, eval_spec


def open_train_eval(cfg: DataConfig, train_examples: int = 0, eval_span: int | None = None, *,
                    user_model_step: int | None = None) -> tuple[BatchSource, BatchSource]:
  """The training and eval sources of a DataConfig, with the eval spec defaulted and checked.

  `train_examples` (steps x batch size): what the training stream must hold. An ads-world eval
  stream is spread over the first `eval_span` examples of its stream (default `train_examples`: the
  training period). With `cfg.user_model`, its checkpoint at `user_model_step` (default the newest)
  adds the user embeddings.
  """
  train_spec, eval_spec = train_eval_specs(cfg)
  files = "adsworld" not in (train_spec.format, eval_spec.format)
  if cfg.count_features and not files:
    raise DataSpecError("--data.count_features needs finite training rows in memory (a file); the ads "
                        "world is a stream: drop --data.count_features")
  if files:
    tr_ex, ev_ex = shared_vocab(open_examples(train_spec, cfg), open_examples(eval_spec, cfg))
    if train_spec.format == eval_spec.format == "aliccp":
      tr_ex, ev_ex = readers.align_aliccp_domains(tr_ex, ev_ex)
    if cfg.count_features:
      tr_ex, ev_ex = add_count_features(tr_ex, ev_ex, cfg.count_features, folds=cfg.count_folds,
                                        seed=cfg.split_seed)
    train, evl = ExamplesSource(tr_ex, seed=cfg.shuffle_seed), ExamplesSource(ev_ex, seed=cfg.shuffle_seed)
  else:
    train = open_source(train_spec, cfg)
    evl = open_source(eval_spec, cfg, train_examples if eval_span is None else eval_span)
    check_stream_length(train, train_examples, "--train.steps x --data.batch_size")
    if isinstance(evl, AdsWorldSource):
      check_stream_length(evl, evl.eval_examples_read(cfg.eval_batch_size),
                          "the evaluation, spread over the training period,")
  if cfg.user_model:
    from jaxrec.data.user_embedding import with_user_embedding  # imports the model stack: only when asked
    train, evl = with_user_embedding(train, evl, cfg.user_model, step=user_model_step)
  check_compatible(train, evl, str(train_spec), str(eval_spec))
  return train, evl


def shared_vocab(a: Examples, b: Examples) -> tuple[Examples, Examples]:
  """Both splits with each sparse feature's vocab_size raised to the larger of the two.

  Readers size a vocabulary by their own file's ids (max + 1), so an eval file can reach ids its
  training file does not (Ali-CCP's own train and val files do); they are ids of the same dataset.
  """
  size = {f.name: f.vocab_size for f in a.schema.sparse}
  for f in b.schema.sparse:
    if f.vocab_size is not None and size.get(f.name) is not None:
      size[f.name] = max(size[f.name], f.vocab_size)

  def widen(ex: Examples) -> Examples:
    sparse = tuple(f if f.vocab_size is None or size.get(f.name) is None else
                   dataclasses.replace(f, vocab_size=size[f.name]) for f in ex.schema.sparse)
    return Examples(dataclasses.replace(ex.schema, sparse=sparse), ex.data, ex.source)

  return widen(a), widen(b)


def share_rows(a: DataSpec, b: DataSpec) -> bool:
  """Whether two specs can hold the same rows: one ads-world stream, or one file (however its path is
  written) unless they are its @train and @eval splits."""
  if a.format == "adsworld" or b.format == "adsworld":
    return a.format == b.format and a.path == b.path
  same_file = resolve_path(a.path).resolve() == resolve_path(b.path).resolve()
  return same_file and {a.split, b.split} != {"train", "eval"}


def check_stream_length(source: BatchSource, examples: int, what: str) -> None:
  """DataSpecError, before any training, when an ads-world stream ends before `examples` (it is
  finite: its requests over the world's horizon)."""
  if not isinstance(source, AdsWorldSource) or examples <= 0:
    return
  held = source.world.num_examples(source.stream)
  if examples > held:
    cfg = source.world.cfg
    raise DataSpecError(f"{what} reads {examples:,} examples of the ads world's {source.stream!r} stream, which "
                        f"holds {held:,} over its {cfg.horizon_days:g}-day horizon: raise --data.world.horizon_days "
                        f"(about {cfg.horizon_days * examples / held:.3g} would do) or train fewer steps")


def check_compatible(train: BatchSource, evl: BatchSource, train_name: str, eval_name: str) -> None:
  a, b = train.schema, evl.schema
  if (a.dense, a.labels, tuple(f.name for f in a.sparse)) != (b.dense, b.labels, tuple(f.name for f in b.sparse)):
    raise DataSpecError(f"{eval_name} has different features or labels than {train_name}; "
                        "eval data must share the training schema")
  if a.num_domains != b.num_domains:
    raise DataSpecError(f"{eval_name} has {b.num_domains} domains, {train_name} {a.num_domains}; eval data must "
                        "share the training domains")
  for fa, fb in zip(a.sparse, b.sparse):
    if fa.vocab_size is not None and (fb.vocab_size is None or fb.vocab_size > fa.vocab_size):
      raise DataSpecError(f"feature {fa.name}: eval ids reach {fb.vocab_size}, beyond the training "
                          f"vocabulary of {fa.vocab_size}")
