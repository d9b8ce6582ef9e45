"""LoKA Dispatch: per GEMM, the fastest kernel whose error stays under a bound, else XLA bf16.

Each GEMM site (a dense layer y = x @ w, x [M, K], w [K, N], M the batch) runs three GEMMs, routed
separately, on the operands the model holds (as `jaxrec.ops.fp8_dense` takes them):

    GEMM    operands (lhs, rhs)       computes         output
    fwd     x [M, K],  w [K, N]       x @ w            [M, N]
    dgrad   dy [M, N], w [K, N]       dy @ w.T         [M, K]
    wgrad   x [M, K],  dy [M, N]      x.T @ dy         [K, N]

A `GemmShape` (gemm, M, K, N, dtype) names one of them by its site's dimensions and the dtype of
the model's operands (the output has it too).

Registry. A `DispatchCandidate` is a name, the `GemmChoice` (numerics + impl) a plan records, and
a builder of its GEMM for a `GemmShape`. `DEFAULT_REGISTRY`, in preference order (ties go to the
earlier one):

    xla_bf16           bf16 operands and result (f32 accumulation), one XLA dot_general, as
                         jaxrec.ops.planned_dense runs a bf16 GEMM (the baseline and the fallback)
    xla_fp8_tensor     fp8_dense(impl="xla") numerics: jaxrec.ops.fp8_scaling.scaled_matmul,
    xla_fp8_row          quantizing both operands each call along that GEMM's contraction
    xla_fp8_block        (e4m3, e5m2 for dy), f32 accumulation
    pallas_fp8_tensor  fp8_dense(impl="pallas"): the Mosaic GPU quantize + FP8 GEMM kernels
    pallas_fp8_row
    pallas_fp8_block

The FP8 builders run the layers' own per-GEMM routing (`jaxrec.ops.fp8_dense.fp8_gemm_nt`, with the
transposes and per-call quantization that fp8_dense and planned_dense do; no fused epilogue), so a
timing is the cost of what the plan will run: quantize both operands + GEMM + scales, not the GEMM
alone (LoKA: quantization is > 30% of small GEMMs).
`Registry.register` returns a registry with one more candidate (no global registry is mutated).

Autotuning (`autotune`, GPU). Each candidate's GEMM is compiled, run once and checked against the
f32 product (MERE <= CHECK_LIMIT, a gross-bug check: a wrong operand reads ~1.4), then timed by
`kernels_pallas.bench.time_us`: one warm-up call, then the median over `iters` calls of the summed
CUPTI kernel time (device-side; launch gaps excluded). Results go to a JSON cache on disk
(`TimingCache`, default ~/.cache/jaxrec/dispatch.json) keyed by device kind, jax version, GEMM,
M x K x N and dtype, one entry per candidate, so later runs measure only what is missing (saves
merge into the file under a lock, so concurrent runs keep each other's timings; an unreadable or
malformed file or entry is dropped with a warning and measured again). A
candidate that raises NotImplementedError for a shape is cached as unsupported (null). Without a
GPU `autotune` returns None: no timings, "not timed".

Rule (`choose_gemm`, `make_plan`), per GEMM:
  timed    among candidates other than xla_bf16 whose MERE, read as the UPPER end of its
           confidence interval (MereEstimate.high), is < `bound` and whose speedup over xla_bf16
           on the same GemmShape (t_bf16 / t_c) is > `min_speedup` (1.05), take the fastest (ties:
           registry order); otherwise xla_bf16. A candidate with no MERE or no timing is not
           eligible; if xla_bf16 itself has no timing the GEMM stays xla_bf16 ("not timed").
  untimed  (timings=None, e.g. on CPU) among the FP8 candidates with impl "xla" (the fake-quant
           numerics, which run on any backend; Pallas needs the GPU it would be timed on) whose
           MERE upper end is < `bound`, take the lowest MERE upper end (ties: registry order);
           otherwise xla_bf16. Speedup "not timed". A pure function of the MERE input, so
           deterministic.
A candidate's MERE is the error model's estimate for its numerics (`mere[site][choice.numerics]
[gemm]`): the XLA and Pallas FP8 paths compute the same numerics (fp8_dense's docstring), so they
share it. One MERE sample has high = inf and is never eligible.

Bound (DEFAULT_BOUND = 0.1, on error_model's MERE = sum|y - ref| / sum|ref|). LoKA's 0.2 is on
its per-element mean of |(y - ref) / ref|, and does not transfer: on N(0, 1) operands at
M = K = N = 256 that per-element mean is already 0.27 for FP8 e4m3 x e4m3 (all three recipes,
measured here) and 0.018 for bf16, so 0.2 on it would refuse FP8 on ideal operands; scaling 0.2 by
the ratio of the two metrics (7.3 measured; ~8 in error_model's docstring) gives 0.027, below
this metric's own FP8 floor (0.0375 for e4m3 x e4m3, 0.059 for the e5m2 gradient GEMMs, error
model closed form) and refuses FP8 everywhere as well. So the default is set on this metric by what
it should separate. MERE / floor is the factor by which an operand distribution amplifies FP8's
rounding error, e.g. through cancellation: x with per-feature mean mu and unit spread against a
weight with centred columns reads ~ floor * sqrt(1 + mu^2) (measured forward, M = K = N = 256:
mu = 2 -> 0.085, mu = 8 -> 0.31, all recipes), LoKA's LayerNorm "mean cancellation". 0.1 admits
an amplification up to 2.7x in the forward GEMM and 1.7x in the gradient GEMMs: above LoKA's
report that sound kernels read up to ~15% (geo-mean) higher on learned than on N(0, 1)
distributions, and far below its faulty kernel (47x). It is 43x the bf16 floor (0.0023). The
bound is an argument; it has not yet been validated against end-to-end NE (issue 4, item 2).

Aggregate (`aggregate`, needs timings): total time of a set of GEMMs (all three per site for a
training step, fwd only for inference) under the plan vs under each single global candidate (every
GEMM the same candidate, bound or not), as speedups over xla_bf16, the best global recipe and the
best one that meets the bound everywhere (LoKA: Dispatch 1.12x vs 1.08x for the best global).

>>> from jaxrec.precision.error_model import MereEstimate
>>> est = lambda v: MereEstimate.from_values([v, v * 1.01, v * 0.99])
>>> meres = {"top.0": {"bf16": {g: est(0.002) for g in GEMMS},
...                    "fp8_row": {g: est(0.04) for g in GEMMS}, "fp8_tensor": {g: est(0.3) for g in GEMMS}}}
>>> plan, rows = make_plan([("top.0", 256, 128)], meres, batch=512)  # no timings: the untimed rule
>>> plan.site("top.0").fwd, rows[0].as_dict()["speedup"]
(GemmChoice(numerics='fp8_row', impl='xla'), 'not timed')
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxrec.ops.fp8_dense import fp8_gemm_nt  # the layer's own per-GEMM routing: time what the plan runs
from jaxrec.ops.fp8_scaling import E4M3, E5M2
from jaxrec.precision.error_model import MereEstimate, mere, reference_matmul
from jaxrec.precision.plan import GEMMS, GemmChoice, PrecisionPlan, SitePrecision

DEFAULT_BOUND = 0.1      # on error_model's MERE; see the module docstring
MIN_SPEEDUP = 1.05       # over xla_bf16 on the same GemmShape
BASELINE = "xla_bf16"
CHECK_LIMIT = 0.25       # autotune's correctness check: 4x the worst FP8 floor on N(0, 1) (0.059)
DTYPES = ("bfloat16", "float32")
DEFAULT_CACHE_PATH = Path.home() / ".cache" / "jaxrec" / "dispatch.json"
NOT_TIMED = "not timed"

GemmFn = Callable[[jax.Array, jax.Array], jax.Array]  # (lhs, rhs) of the table above -> output
SiteMere = Mapping[str, Mapping[str, MereEstimate]]   # numerics -> gemm -> estimate
# (gemm, output dtype, interpret) -> GEMM over the operands of the table above (unjitted)
MakeGemm = Callable[[str, jnp.dtype, bool], GemmFn]
# (jitted GEMM, operands) -> microseconds
Timer = Callable[[GemmFn, tuple[jax.Array, jax.Array]], float]


@dataclasses.dataclass(frozen=True, order=True)
class GemmShape:
  """One GEMM of a site x [m, k] @ w [k, n]: `gemm` in fwd/dgrad/wgrad, operands and output in dtype."""
  gemm: str
  m: int
  k: int
  n: int
  dtype: str = "bfloat16"

  def __post_init__(self):
    if self.gemm not in GEMMS:
      raise ValueError(f"unknown GEMM {self.gemm!r}; choose one of {GEMMS}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if min(self.m, self.k, self.n) < 1:
      raise ValueError(f"GEMM dimensions must be positive, got {self.m} x {self.k} x {self.n}")

  @property
  def operand_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
    m, k, n = self.m, self.k, self.n
    return {"fwd": ((m, k), (k, n)), "dgrad": ((m, n), (k, n)), "wgrad": ((m, k), (m, n))}[self.gemm]

  @property
  def contraction(self) -> int:
    return {"fwd": self.k, "dgrad": self.n, "wgrad": self.m}[self.gemm]

  def operands(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """N(0, 1) lhs and N(0, 1 / contraction) rhs in `dtype` (outputs of unit scale)."""
    (ls, rs), (ka, kb) = self.operand_shapes, jax.random.split(key)
    lhs = jax.random.normal(ka, ls, jnp.float32)
    rhs = jax.random.normal(kb, rs, jnp.float32) / jnp.sqrt(float(self.contraction))
    return lhs.astype(self.dtype), rhs.astype(self.dtype)

  def reference(self, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """The f32 product this GEMM approximates."""
    a, b = {"fwd": (lhs, rhs), "dgrad": (lhs, rhs.T), "wgrad": (lhs.T, rhs)}[self.gemm]
    return reference_matmul(a, b)

  @property
  def flops(self) -> int:
    return 2 * self.m * self.k * self.n


def site_shapes(sites: Sequence[tuple[str, int, int]], *, batch: int, dtype: str = "bfloat16",
                gemms: Sequence[str] = GEMMS) -> list[GemmShape]:
  """The distinct GemmShapes of (name, K, N) sites at `batch` rows (sites of equal shape share them)."""
  return sorted({GemmShape(g, batch, k, n, dtype) for _, k, n in sites for g in gemms})


# --------------------------------------------------------------------------------------------
# Registry


# dot_general dimension numbers of each GEMM on the operands as held (jaxrec.ops.planned_dense's)
_DIMS = {"fwd": (((1,), (0,)), ((), ())), "dgrad": (((1,), (1,)), ((), ())), "wgrad": (((0,), (0,)), ((), ()))}


def _bf16_gemm(gemm: str, out_dtype, interpret: bool) -> GemmFn:
  """planned_dense's plain bf16 GEMM: bf16 operands, one dot_general with a bf16 result, cast."""
  del interpret
  dims = _DIMS[gemm]
  return lambda a, b: jax.lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims).astype(out_dtype)


def _fp8_gemm(recipe: str, impl: str) -> MakeGemm:
  def make(gemm: str, out_dtype, interpret: bool) -> GemmFn:
    run = lambda a, b_nk, da, db: fp8_gemm_nt(a, b_nk, recipe=recipe, a_dtype=da, b_dtype=db,  # noqa: E731
                                           out_dtype=out_dtype, impl=impl, interpret=interpret and impl == "pallas")
    # as fp8_dense: y = x @ w, dx = dy @ w.T, dw = x.T @ dy, each as a @ b_nk.T
    return {"fwd": lambda x, w: run(x, w.T, E4M3, E4M3), "dgrad": lambda dy, w: run(dy, w, E5M2, E4M3),
            "wgrad": lambda x, dy: run(x.T, dy.T, E4M3, E5M2)}[gemm]
  return make


@dataclasses.dataclass(frozen=True)
class DispatchCandidate:
  """A kernel choice for one GEMM: what the plan records (`choice`) and how to build it for timing."""
  name: str
  choice: GemmChoice
  make_gemm: MakeGemm

  def build(self, shape: GemmShape, *, interpret: bool = False) -> GemmFn:
    """The jitted GEMM of `shape` (operands as GemmShape.operands); interpret: Pallas on CPU (tests)."""
    return jax.jit(self.make_gemm(shape.gemm, jnp.dtype(shape.dtype), interpret))


@dataclasses.dataclass(frozen=True)
class Registry:
  """Dispatch candidates in preference order (the first wins ties); must hold BASELINE."""
  candidates: tuple[DispatchCandidate, ...]

  def __post_init__(self):
    names = [c.name for c in self.candidates]
    if len(set(names)) != len(names):
      raise ValueError(f"candidate names must be unique, got {names}")
    if BASELINE not in names:
      raise ValueError(f"a registry must hold the baseline {BASELINE!r}, got {names}")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(c.name for c in self.candidates)

  def __contains__(self, name: str) -> bool:
    return name in self.names

  def __getitem__(self, name: str) -> DispatchCandidate:
    for c in self.candidates:
      if c.name == name:
        return c
    raise KeyError(f"unknown dispatch candidate {name!r}; registered: {self.names}")

  def register(self, candidate: DispatchCandidate) -> "Registry":
    """A new registry with `candidate` appended (last in preference)."""
    return Registry(self.candidates + (candidate,))

  def select(self, names: Sequence[str]) -> "Registry":
    """The named candidates (BASELINE always kept), in this registry's order."""
    unknown = set(names) - set(self.names)
    if unknown:
      raise KeyError(f"unknown dispatch candidates {sorted(unknown)}; registered: {self.names}")
    return Registry(tuple(c for c in self.candidates if c.name in set(names) | {BASELINE}))


DEFAULT_REGISTRY = Registry((
    DispatchCandidate(BASELINE, GemmChoice("bf16", "xla"), _bf16_gemm),
    *(DispatchCandidate(f"{impl}_fp8_{r}", GemmChoice(f"fp8_{r}", impl), _fp8_gemm(r, impl))
      for impl in ("xla", "pallas") for r in ("tensor", "row", "block")),
))


# --------------------------------------------------------------------------------------------
# Timings, the on-disk cache and autotuning


@dataclasses.dataclass(frozen=True)
class Timings:
  """Microseconds per GemmShape and candidate on one device kind (None: candidate unsupported)."""
  device_kind: str
  us: Mapping[GemmShape, Mapping[str, float | None]]

  def get(self, shape: GemmShape, name: str) -> float | None:
    return self.us.get(shape, {}).get(name)


def _valid_us(t) -> bool:
  """A cached timing: positive finite microseconds, or None (unsupported)."""
  return t is None or (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < float("inf"))


def _read_cache(path: Path) -> dict[str, dict]:
  """The valid entries of a timing cache file ({} when there is none). A cache only saves work, so
  a file that is not readable JSON (truncated, foreign) or entries of the wrong form are dropped
  with a warning, to be measured again, never a reason to fail."""
  if not path.exists():
    return {}
  try:
    raw = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    warnings.warn(f"dispatch timing cache {path} is unreadable ({e}); timings will be measured again")
    return {}
  raw = raw if isinstance(raw, dict) else {None: raw}
  entries = {k: e for k, e in raw.items() if isinstance(e, dict) and isinstance(e.get("us"), dict)
             and all(_valid_us(t) for t in e["us"].values())}
  if len(entries) != len(raw):
    warnings.warn(f"dispatch timing cache {path}: ignoring malformed entries; they will be measured again")
  return entries


class TimingCache:
  """Dispatch timings as JSON on disk: {key: {"device_kind", "jax", "gemm", "m", "k", "n", "dtype",
  "us": {candidate: microseconds or null}}}, key = "device kind|jax version|gemm|MxKxN|dtype"."""

  def __init__(self, path: str | Path = DEFAULT_CACHE_PATH, *, jax_version: str = jax.__version__):
    self.path = Path(path).expanduser()
    self.jax_version = jax_version
    self.entries: dict[str, dict] = _read_cache(self.path)

  def key(self, device_kind: str, shape: GemmShape) -> str:
    return f"{device_kind}|jax-{self.jax_version}|{shape.gemm}|{shape.m}x{shape.k}x{shape.n}|{shape.dtype}"

  def get(self, device_kind: str, shape: GemmShape) -> dict[str, float | None]:
    return dict(self.entries.get(self.key(device_kind, shape), {}).get("us", {}))

  def put(self, device_kind: str, shape: GemmShape, name: str, us: float | None) -> None:
    entry = self.entries.setdefault(self.key(device_kind, shape), {
        "device_kind": device_kind, "jax": self.jax_version, **dataclasses.asdict(shape), "us": {}})
    entry["us"][name] = us

  def save(self) -> None:
    """Merges this cache's entries into the file's current ones (another process may have saved
    since this one read it) and writes atomically (temporary file in the same folder, then rename),
    under an exclusive lock on PATH.lock."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      merged = _read_cache(self.path)
      for key, entry in self.entries.items():
        merged[key] = {**entry, "us": {**merged.get(key, {}).get("us", {}), **entry["us"]}}
      self.entries = merged
      fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
      with os.fdopen(fd, "w") as f:
        json.dump(self.entries, f, indent=1, sort_keys=True)
      os.replace(tmp, self.path)

  def timings(self, device_kind: str, shapes: Sequence[GemmShape]) -> Timings:
    return Timings(device_kind, {s: self.get(device_kind, s) for s in shapes})


def _gpu_timer(iters: int) -> Timer:
  from kernels_pallas.bench import time_us  # CUPTI kernel time; imported only where it runs
  return lambda fn, args: time_us(fn, args, iters, True)


def autotune(shapes: Sequence[GemmShape], *, registry: Registry = DEFAULT_REGISTRY,
             cache_path: str | Path | None = DEFAULT_CACHE_PATH, timer: Timer | None = None, iters: int = 20,
             device_kind: str | None = None, key: jax.Array | None = None) -> Timings | None:
  """Times every registry candidate on every shape; returns None ("not timed") without a GPU.

  Cached timings (same device kind, jax version, shape, dtype, candidate) are reused, new ones
  written to `cache_path` after each shape (None: no disk cache). Each new candidate is first run
  once on N(0, 1) operands and checked (finite, MERE against the f32 product <= CHECK_LIMIT,
  else RuntimeError), then timed by `timer` (default on GPU: kernels_pallas.bench.time_us, CUPTI,
  median of `iters` after one warm-up). Passing `timer` times on any backend (tests; Pallas
  candidates then run in the interpreter).
  """
  on_gpu = jax.default_backend() == "gpu"
  if timer is None:
    if not on_gpu:
      return None
    timer = _gpu_timer(iters)
  device_kind = device_kind or jax.devices()[0].device_kind
  cache = TimingCache(cache_path) if cache_path is not None else None
  key = jax.random.key(0) if key is None else key
  us: dict[GemmShape, dict[str, float | None]] = {}
  for i, shape in enumerate(shapes):
    got = cache.get(device_kind, shape) if cache is not None else {}
    missing = [c for c in registry.candidates if c.name not in got]
    if missing:
      lhs, rhs = shape.operands(jax.random.fold_in(key, i))
      ref = shape.reference(lhs, rhs)
      for c in missing:
        got[c.name] = _measure(c, shape, lhs, rhs, ref, timer, interpret=not on_gpu)
        if cache is not None:
          cache.put(device_kind, shape, c.name, got[c.name])
      if cache is not None:
        cache.save()
    us[shape] = {c.name: got[c.name] for c in registry.candidates}
  return Timings(device_kind, us)


def _measure(c: DispatchCandidate, shape: GemmShape, lhs, rhs, ref, timer: Timer, *, interpret: bool) -> float | None:
  try:
    fn = c.build(shape, interpret=interpret)
    y = jax.block_until_ready(fn(lhs, rhs))
  except NotImplementedError:
    return None  # a shape the kernel was never benchmarked for: not a candidate here
  err = float(mere(y, ref)) if y.shape == ref.shape else float("inf")
  if not err <= CHECK_LIMIT:  # also NaN
    raise RuntimeError(f"dispatch candidate {c.name!r} computes a wrong {shape}: output {y.shape} "
                       f"(want {ref.shape}), MERE {err:.3g} against the f32 product (limit {CHECK_LIMIT})")
  return float(timer(fn, (lhs, rhs)))


# --------------------------------------------------------------------------------------------
# The rule and the plan


@dataclasses.dataclass(frozen=True)
class ReportRow:
  """The choice for one GEMM of one site, with its MERE and speedup (None: not timed)."""
  site: str
  shape: GemmShape
  candidate: str
  choice: GemmChoice
  mere: MereEstimate | None
  speedup: float | None
  reason: str

  def as_dict(self) -> dict:
    return {"site": self.site, "gemm": self.shape.gemm, "m": self.shape.m, "k": self.shape.k,
            "n": self.shape.n, "dtype": self.shape.dtype, "candidate": self.candidate,
            "numerics": self.choice.numerics, "impl": self.choice.impl,
            "mere": None if self.mere is None else self.mere.as_dict(),
            "speedup": NOT_TIMED if self.speedup is None else self.speedup, "reason": self.reason}


def _mere_of(site_mere: SiteMere | None, c: DispatchCandidate, gemm: str) -> MereEstimate | None:
  return (site_mere or {}).get(c.choice.numerics, {}).get(gemm)


def _validate(bound: float, min_speedup: float) -> None:
  if not bound > 0 or not min_speedup > 0:
    raise ValueError(f"bound and min_speedup must be positive, got {bound} and {min_speedup}")


def choose_gemm(site: str, shape: GemmShape, site_mere: SiteMere | None, timings: Timings | None, *,
                bound: float = DEFAULT_BOUND, min_speedup: float = MIN_SPEEDUP,
                registry: Registry = DEFAULT_REGISTRY) -> ReportRow:
  """The rule of the module docstring for one GEMM (timed when `timings` is given, else untimed)."""
  _validate(bound, min_speedup)
  base = registry[BASELINE]
  order = {c.name: i for i, c in enumerate(registry.candidates)}
  safe = [c for c in registry.candidates if c.name != BASELINE
          and (e := _mere_of(site_mere, c, shape.gemm)) is not None and e.high < bound]

  def row(c: DispatchCandidate, speedup: float | None, reason: str) -> ReportRow:
    return ReportRow(site, shape, c.name, c.choice, _mere_of(site_mere, c, shape.gemm), speedup, reason)

  if timings is None:
    pool = [c for c in safe if c.choice.is_fp8 and c.choice.impl == "xla"]
    if not pool:
      return row(base, None, f"untimed: no XLA FP8 candidate with MERE upper end < {bound:g}")
    best = min(pool, key=lambda c: (_mere_of(site_mere, c, shape.gemm).high, order[c.name]))
    return row(best, None, f"untimed: lowest MERE upper end of {len(pool)} XLA FP8 candidates < {bound:g}")

  t_base = timings.get(shape, BASELINE)
  if t_base is None:
    return row(base, None, f"{BASELINE} not timed for this shape")
  speed = {c.name: t_base / t for c in safe if (t := timings.get(shape, c.name)) is not None}
  fast = [c for c in safe if speed.get(c.name, 0.0) > min_speedup]
  if not fast:
    return row(base, 1.0, f"no candidate with MERE upper end < {bound:g} and speedup > {min_speedup:g}")
  best = min(fast, key=lambda c: (t_base / speed[c.name], order[c.name]))
  return row(best, speed[best.name], f"fastest of {len(fast)} candidates with MERE upper end < {bound:g} "
                                     f"and speedup > {min_speedup:g}")


def make_plan(sites: Sequence[tuple[str, int, int]], mere: Mapping[str, SiteMere], *, batch: int,
              timings: Timings | None = None, dtype: str = "bfloat16", bound: float = DEFAULT_BOUND,
              min_speedup: float = MIN_SPEEDUP,
              registry: Registry = DEFAULT_REGISTRY) -> tuple[PrecisionPlan, list[ReportRow]]:
  """A PrecisionPlan for (name, K, N) sites at `batch` rows, and one ReportRow per site and GEMM.

  mere: {site: {numerics: {gemm: MereEstimate}}} (error_model.mere_for_site per site; a site or
  numerics it lacks is not eligible for FP8). timings: from `autotune` (None: the untimed rule).
  Every site is named in the plan (all-bf16 ones too); its default stays bf16.
  """
  names = [s[0] for s in sites]
  if len(set(names)) != len(names):
    raise ValueError(f"site names must be unique, got {names}")
  rows, plan_sites = [], {}
  for name, k, n in sites:
    site_rows = [choose_gemm(name, GemmShape(g, batch, k, n, dtype), mere.get(name), timings, bound=bound,
                             min_speedup=min_speedup, registry=registry) for g in GEMMS]
    plan_sites[name] = SitePrecision(**{r.shape.gemm: r.choice for r in site_rows})
    rows += site_rows
  return PrecisionPlan(sites=plan_sites, shapes={name: (k, n) for name, k, n in sites}), rows


# --------------------------------------------------------------------------------------------
# Aggregate throughput: the plan vs single global recipes


@dataclasses.dataclass(frozen=True)
class Aggregate:
  """Summed time of a set of GEMMs under the plan and under each candidate applied everywhere."""
  gemms: tuple[str, ...]
  plan_us: float
  global_us: Mapping[str, float | None]          # None: some GEMM untimed / unsupported
  global_within_bound: Mapping[str, bool | None]  # every GEMM's MERE upper end < bound (None: no MERE)

  @property
  def baseline_us(self) -> float:
    return self.global_us[BASELINE]

  @property
  def plan_speedup(self) -> float:
    return self.baseline_us / self.plan_us

  def global_speedup(self, name: str) -> float | None:
    t = self.global_us[name]
    return None if t is None else self.baseline_us / t

  def _best(self, names) -> str:
    return min((n for n in names if self.global_us[n] is not None), key=lambda n: self.global_us[n])

  @property
  def best_global(self) -> str:
    """The fastest single global candidate, bound or not (xla_bf16 if nothing beats it)."""
    return self._best(self.global_us)

  @property
  def best_global_within_bound(self) -> str:
    return self._best(n for n in self.global_us if n == BASELINE or self.global_within_bound[n])

  def as_dict(self) -> dict:
    best, safe = self.best_global, self.best_global_within_bound
    return {"gemms": list(self.gemms), "plan_us": self.plan_us, "bf16_us": self.baseline_us,
            "plan_speedup": self.plan_speedup,
            "global": {n: {"us": t, "speedup": self.global_speedup(n), "within_bound": self.global_within_bound[n]}
                       for n, t in self.global_us.items()},
            "best_global": best, "best_global_speedup": self.global_speedup(best),
            "best_global_within_bound": safe, "best_global_within_bound_speedup": self.global_speedup(safe),
            "plan_vs_best_global": self.global_us[best] / self.plan_us}


def aggregate(rows: Sequence[ReportRow], timings: Timings, *, mere: Mapping[str, SiteMere] | None = None,
              bound: float = DEFAULT_BOUND, gemms: Sequence[str] = GEMMS,
              registry: Registry = DEFAULT_REGISTRY) -> Aggregate:
  """Time of the GEMMs in `rows` (those in `gemms`: all three for a training step, ("fwd",) for
  inference) under the rows' choices and under each registry candidate alone.

  Each row counts once (one call per GEMM per step). Raises ValueError when a chosen candidate or
  the baseline has no timing for a row's shape.
  """
  picked = [r for r in rows if r.shape.gemm in gemms]
  if not picked:
    raise ValueError(f"no report rows for GEMMs {tuple(gemms)}")

  def total(name_of: Callable[[ReportRow], str]) -> float | None:
    ts = [timings.get(r.shape, name_of(r)) for r in picked]
    return None if any(t is None for t in ts) else float(sum(ts))

  plan_us = total(lambda r: r.candidate)
  global_us = {c.name: total(lambda r, n=c.name: n) for c in registry.candidates}
  if plan_us is None or global_us[BASELINE] is None:
    raise ValueError("aggregate needs timings of the chosen candidates and of the baseline for every GEMM")
  within = {c.name: None if mere is None else all(
      (e := _mere_of(mere.get(r.site), c, r.shape.gemm)) is not None and e.high < bound for r in picked)
      for c in registry.candidates}
  within[BASELINE] = True
  return Aggregate(tuple(gemms), plan_us, global_us, within)
