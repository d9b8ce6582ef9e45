"""LoKA Probe error model: MERE of candidate GEMM numerics on operands drawn from Probe statistics.

A dense site y = x @ w (x [B, K], w [K, N]) runs three GEMMs, each scored on its own:

    GEMM    computes        lhs          rhs          FP8 dtypes (lhs, rhs)
    fwd     y  = x @ w      x [B, K]     w [K, N]     e4m3, e4m3
    dgrad   dx = dy @ w.T   dy [B, N]    w.T [N, K]   e5m2, e4m3
    wgrad   dw = x.T @ dy   x.T [K, B]   dy [B, N]    e4m3, e5m2

which is how `jaxrec.ops.fp8_dense` routes them. A `Candidate` is one numerics for all three;
`CANDIDATES` holds "f32" (the reference itself), "bf16" (operands rounded to bf16, f32
accumulation) and "fp8_tensor" / "fp8_row" / "fp8_block" (`jaxrec.ops.fp8_scaling.scaled_matmul`
under that recipe: the XLA fake-quant numerics, which the Pallas kernels reproduce). The reference
is the f32 product at precision="highest" (true f32, not TF32, on GPU).

MERE (the one error metric of the Probe and the precision plan):

    MERE(y, ref) = sum_ij |y_ij - ref_ij| / (sum_ij |ref_ij| + tiny)
                 = mean_ij |y_ij - ref_ij| / mean_ij |ref_ij|     (tiny = f32 smallest normal)

i.e. the mean absolute error in units of the mean absolute output. Why not LoKA's per-element
sum_ij |(y_ij - ref_ij) / ref_ij| (papers.md 4(a), whose notes even leave out the 1/(MN))? The
outputs of a GEMM over zero-mean operands are close to Gaussian around 0, so |ref_ij| has positive
density at 0 and E[1 / |ref_ij|] is infinite: the per-element mean has no expectation, is
dominated by the few outputs nearest 0, grows with the number of outputs, and its interval over
samples does not shrink. Normalising the whole error by the whole output keeps what the name
promises (a scale-free mean relative error) with finite variance, stays defined when single
outputs are 0, is exactly 0 for the reference and is monotone in the error. On N(0, 1) operands it
has a closed form: rounding to m mantissa bits leaves a relative error uniform in +-2^-(m+1) / s for
significand s, E[1/s^2] = 3 / (8 ln 2) (log-uniform s), and the output error and output are both
near Gaussian, so MERE = sqrt(sum over the two operands of 2^-2(m+1) E[1/s^2] / 3): 0.0375 for
e4m3 x e4m3, 0.059 for e5m2 x e4m3, 0.0023 for bf16 (measured 0.0373, 0.0587, 0.0023). LoKA's
per-element mean reads about 8x higher on the same outputs (0.30 for e4m3, 0.021 for bf16 at
K = 256), so a bound such as Dispatch's 0.2 must be calibrated on this definition, not copied.

Operands: activations x ~ N(mean, cov) per row (a `Gaussian`, e.g. from `stats.Welford`), weights
w ~ MN(M, U, V) = M + L_U Z L_V^T (a `MatrixNormal`, e.g. from `stats.MatrixNormalEMA` or
`stats.flip_flop`), output gradients dy from their own `Gaussian` when given, else N(0, 1).
`Gaussian.standard` / `MatrixNormal.standard` give the N(0, 1) baseline. Covariances are factored by
Cholesky after adding `jitter * mean(diag)` to the diagonal (jitter 1e-6, raised x10 until the factor
is finite, at most 1e-2).

Interval: each sample is an independent draw of (x, w, dy), so the per-sample MEREs are i.i.d.;
each is a ratio of sums over B*N (or K*N) outputs with finite variance, so their mean is close to
normal and `MereEstimate` reports the Student-t interval mean +- t_{(1+c)/2, S-1} * sd / sqrt(S)
(lower end clipped at 0).

XLA excess precision (peers.md 4.2: convert f32->f8->bf16 folded away on GPU unless
--xla_allow_excess_precision=false) happens on CPU too (jax 0.11.2, default flags): jitted together
with the f32 reference, as the error model jits them, the bf16 dgrad and wgrad GEMMs lost the
rounding of one operand (MERE 0.00166 instead of 0.00235 = the closed form), and bf16 a @ w.T with
its reference in one function even gave MERE 0. The FP8 candidates kept their rounding (their dots
take the FP8 arrays themselves). So every jitted computation here is compiled with
COMPILER_OPTIONS = {"xla_allow_excess_precision": False}, per function (no process-wide XLA_FLAGS),
and `check_real_quantization` compares the jitted MEREs with a host replay of the operands'
rounding (numpy / ml_dtypes, float64 products): with those options every gap is f32 rounding; with
XLA's defaults it raises on bf16 dgrad / wgrad. Run it once on the backend that runs the Probe (GPU
not measured yet).

>>> import jax.numpy as jnp
>>> round(float(mere(jnp.array([1.0, 2.0]), jnp.array([1.0, 4.0]))), 6)  # (0 + 2) / (1 + 4)
0.4
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import scipy.stats
from flax import struct

from jaxrec.ops.fp8_scaling import BLOCK, E4M3, E5M2, RECIPES, quantize_lhs, quantize_rhs, scaled_matmul
from jaxrec.precision.stats import MatrixNormalEMA, Welford

GEMMS: tuple[str, ...] = ("fwd", "dgrad", "wgrad")
# (lhs dtype, rhs dtype) of each GEMM's FP8 operands: the output gradient dy is e5m2
FP8_DTYPES = {"fwd": (E4M3, E4M3), "dgrad": (E5M2, E4M3), "wgrad": (E4M3, E5M2)}
_TINY = float(jnp.finfo(jnp.float32).tiny)
# Every jitted computation here is compiled with these options (see "XLA excess precision" above).
COMPILER_OPTIONS = {"xla_allow_excess_precision": False}

Matmul = Callable[[jax.Array, jax.Array], jax.Array]  # (a [M, C] f32, b [C, N] f32) -> [M, N] f32


def mere(y: jax.Array, ref: jax.Array, a: jax.Array | None = None, b: jax.Array | None = None) -> jax.Array:
  """Mean element-wise relative error, sum|y - ref| / (sum|ref| + tiny), of any shape -> f32 [].
  (a, b: the GEMM's operands, which only `operand_scaled_error` reads.)"""
  y, ref = y.astype(jnp.float32), ref.astype(jnp.float32)
  return jnp.sum(jnp.abs(y - ref)) / (jnp.sum(jnp.abs(ref)) + _TINY)


def elementwise_mean_error(y: jax.Array, ref: jax.Array, a=None, b=None) -> jax.Array:
  """LoKA's per-element form, mean_ij |y_ij - ref_ij| / |ref_ij| (no finite expectation for outputs
  with density at 0, see above; for comparison with the paper only, never for the plan)."""
  y, ref = y.astype(jnp.float32), ref.astype(jnp.float32)
  return jnp.mean(jnp.abs(y - ref) / (jnp.abs(ref) + _TINY))


def elementwise_median_error(y: jax.Array, ref: jax.Array, a=None, b=None) -> jax.Array:
  """median_ij |y_ij - ref_ij| / |ref_ij|: the per-element form made robust to outputs near 0."""
  y, ref = y.astype(jnp.float32), ref.astype(jnp.float32)
  return jnp.median(jnp.abs(y - ref) / (jnp.abs(ref) + _TINY))


def operand_scaled_error(y: jax.Array, ref: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """sum|y - ref| / sum_ij sqrt(sum_k a_ik^2 b_kj^2) for y ~ a [M, C] @ b [C, N]: the error in units of
  the operand products' magnitude, the scale rounding errors add up on, instead of the output's.
  MERE divides by sum|ref|, which operands whose products add up coherently (non-zero means, as
  after a ReLU) make large and zero-mean ones make small, with the same rounding error: the ratio of
  two distributions' MEREs is then mostly their outputs' coherence (comparisons only)."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  y, ref = y.astype(jnp.float32), ref.astype(jnp.float32)
  scale = jnp.sqrt(reference_matmul(a * a, b * b))
  return jnp.sum(jnp.abs(y - ref)) / (jnp.sum(scale) + _TINY)


METRICS: dict[str, Callable[..., jax.Array]] = {
    "mere": mere, "elementwise_mean": elementwise_mean_error, "elementwise_median": elementwise_median_error,
    "operand_scaled": operand_scaled_error}
"""Error metrics the error model can score with; "mere" (the default) is the one plans use."""


def _metric(name: str):
  if name not in METRICS:
    raise ValueError(f"unknown error metric {name!r}; choose one of {', '.join(METRICS)}")
  return METRICS[name]


def reference_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [M, C] @ b [C, N] in f32 at precision="highest" (the reference of every candidate)."""
  return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision="highest",
                 preferred_element_type=jnp.float32)


def bf16_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b with both operands rounded to bf16 and f32 accumulation."""
  return jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One numerics for a site's three GEMMs; each callable computes a @ b (see the module table)."""
  name: str
  fwd: Matmul    # (x [B, K], w [K, N]) -> [B, N]
  dgrad: Matmul  # (dy [B, N], w.T [N, K]) -> [B, K]
  wgrad: Matmul  # (x.T [K, B], dy [B, N]) -> [K, N]

  def gemm(self, which: str) -> Matmul:
    return {"fwd": self.fwd, "dgrad": self.dgrad, "wgrad": self.wgrad}[which]


def _fp8_candidate(recipe: str) -> Candidate:
  fns = {g: functools.partial(scaled_matmul, recipe=recipe, a_dtype=a, b_dtype=b, out_dtype=jnp.float32)
         for g, (a, b) in FP8_DTYPES.items()}
  return Candidate(f"fp8_{recipe}", **fns)


CANDIDATES: dict[str, Candidate] = {
    "f32": Candidate("f32", reference_matmul, reference_matmul, reference_matmul),
    "bf16": Candidate("bf16", bf16_matmul, bf16_matmul, bf16_matmul),
    **{f"fp8_{r}": _fp8_candidate(r) for r in RECIPES},
}


def get_candidates(names: Sequence[str | Candidate]) -> tuple[Candidate, ...]:
  """Registry names (or Candidate objects, passed through) -> candidates."""
  out = []
  for c in names:
    if isinstance(c, Candidate):
      out.append(c)
    elif c in CANDIDATES:
      out.append(CANDIDATES[c])
    else:
      raise ValueError(f"unknown candidate {c!r}; registered: {tuple(CANDIDATES)}")
  if len({c.name for c in out}) != len(out):
    raise ValueError(f"candidate names must be unique, got {[c.name for c in out]}")
  return tuple(out)


# --------------------------------------------------------------------------------------------
# Distributions and sampling


@struct.dataclass
class Gaussian:
  """Rows ~ N(mean [F], cov [F, F])."""
  mean: jax.Array
  cov: jax.Array

  @classmethod
  def from_welford(cls, w: Welford) -> "Gaussian":
    return cls(w.mean, w.covariance())

  @classmethod
  def standard(cls, features: int) -> "Gaussian":
    return cls(jnp.zeros((features,), jnp.float32), jnp.eye(features, dtype=jnp.float32))


@struct.dataclass
class MatrixNormal:
  """W ~ MN(mean [K, N], u [K, K], v [N, N]): cov(vec W) = v kron u."""
  mean: jax.Array
  u: jax.Array
  v: jax.Array

  @classmethod
  def from_ema(cls, ema: MatrixNormalEMA) -> "MatrixNormal":
    return cls(ema.mean, ema.u, ema.v)

  @classmethod
  def standard(cls, k: int, n: int) -> "MatrixNormal":
    return cls(jnp.zeros((k, n), jnp.float32), jnp.eye(k, dtype=jnp.float32), jnp.eye(n, dtype=jnp.float32))


def cholesky_factor(cov: jax.Array, *, jitter: float = 1e-6, max_jitter: float = 1e-2) -> jax.Array:
  """Lower L [F, F] with L L^T = cov + eps * mean(diag(cov)) * I, eps from jitter up x10 until finite.
  A zero covariance (no spread seen, e.g. a weight factor after a single Probe update) gives L = 0."""
  cov = jnp.asarray(cov, jnp.float32)
  cov = (cov + cov.T) / 2
  f = cov.shape[0]
  if not bool(jnp.any(cov != 0)):
    return jnp.zeros_like(cov)
  level = jnp.maximum(jnp.mean(jnp.diag(cov)), _TINY)
  eps = jitter
  while eps <= max_jitter * (1 + 1e-6):
    chol = jnp.linalg.cholesky(cov + eps * level * jnp.eye(f, dtype=jnp.float32))
    if bool(jnp.all(jnp.isfinite(chol))):
      return chol
    eps *= 10
  raise ValueError(f"covariance [{f}, {f}] is not positive semi-definite even with jitter {max_jitter}")


@struct.dataclass
class _Factors:
  """Cholesky factors of one site's statistics, computed once per site (host side)."""
  x_mean: jax.Array  # [K]
  x_chol: jax.Array  # [K, K]
  w_mean: jax.Array  # [K, N]
  u_chol: jax.Array  # [K, K]
  v_chol: jax.Array  # [N, N]
  dy_mean: jax.Array | None  # [N]
  dy_chol: jax.Array | None  # [N, N]


def _factor(x: Gaussian, w: MatrixNormal, dy: Gaussian | None, jitter: float) -> _Factors:
  k, n = w.mean.shape
  if x.mean.shape != (k,) or (dy is not None and dy.mean.shape != (n,)):
    raise ValueError(f"statistics disagree: x over {x.mean.shape}, w {w.mean.shape}, "
                     f"dy over {None if dy is None else dy.mean.shape}")
  chol = functools.partial(cholesky_factor, jitter=jitter)
  return _Factors(jnp.asarray(x.mean, jnp.float32), chol(x.cov), jnp.asarray(w.mean, jnp.float32),
                  chol(w.u), chol(w.v), None if dy is None else jnp.asarray(dy.mean, jnp.float32),
                  None if dy is None else chol(dy.cov))


def _gaussian_rows(key, mean, chol, n):
  return mean + jax.random.normal(key, (n, mean.shape[0]), jnp.float32) @ chol.T


def sample_gaussian(key: jax.Array, g: Gaussian, n: int, *, jitter: float = 1e-6) -> jax.Array:
  """n rows [n, F] of N(g.mean, g.cov): mean + Z L^T (host-side factorisation: not jittable)."""
  return _gaussian_rows(key, jnp.asarray(g.mean, jnp.float32), cholesky_factor(g.cov, jitter=jitter), n)


def _matrix_normal(key, mean, u_chol, v_chol):
  return mean + u_chol @ jax.random.normal(key, mean.shape, jnp.float32) @ v_chol.T


def sample_matrix_normal(key: jax.Array, mn: MatrixNormal, num: int, *, jitter: float = 1e-6) -> jax.Array:
  """num independent W [num, K, N] = M + L_U Z L_V^T (host-side factorisation: not jittable)."""
  u, v = cholesky_factor(mn.u, jitter=jitter), cholesky_factor(mn.v, jitter=jitter)
  mean = jnp.asarray(mn.mean, jnp.float32)
  return jax.vmap(lambda k: _matrix_normal(k, mean, u, v))(jax.random.split(key, num))


# --------------------------------------------------------------------------------------------
# MERE per site and candidate


@dataclasses.dataclass(frozen=True)
class MereEstimate:
  """Mean MERE over S samples with its Student-t interval [low, high] at `confidence`."""
  mean: float
  low: float
  high: float
  confidence: float
  values: tuple[float, ...]  # per-sample MERE

  @classmethod
  def from_values(cls, values: Sequence[float], confidence: float = 0.95) -> "MereEstimate":
    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if v.size < 2:
      return cls(mean, 0.0, float("inf"), confidence, tuple(map(float, v)))
    half = float(scipy.stats.t.ppf((1 + confidence) / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return cls(mean, max(mean - half, 0.0), mean + half, confidence, tuple(map(float, v)))

  def as_dict(self) -> dict:
    return {"mean": self.mean, "low": self.low, "high": self.high, "confidence": self.confidence,
            "samples": len(self.values)}


SiteMere = dict[str, dict[str, MereEstimate]]  # candidate name -> GEMM ("fwd"/"dgrad"/"wgrad") -> estimate


def _gemm_operands(x, w, dy) -> dict[str, tuple[jax.Array, jax.Array]]:
  return {"fwd": (x, w), "dgrad": (dy, w.T), "wgrad": (x.T, dy)}


def _site_meres(x, w, dy, candidates: tuple[Candidate, ...], metric: str = "mere") -> jax.Array:
  """[C, 3] MERE (or `metric`) of each candidate's fwd, dgrad, wgrad on one (x [B, K], w [K, N], dy [B, N])."""
  score = _metric(metric)
  operands = _gemm_operands(x, w, dy)
  refs = {g: reference_matmul(*operands[g]) for g in GEMMS}
  return jnp.stack([jnp.stack([score(c.gemm(g)(*operands[g]), refs[g], *operands[g]) for g in GEMMS])
                    for c in candidates])


@functools.partial(jax.jit, static_argnames=("candidates", "batch", "metric"), compiler_options=COMPILER_OPTIONS)
def _sampled_meres(keys, fac: _Factors, *, candidates, batch, metric="mere"):
  def one(key):
    kx, kw, kd = jax.random.split(key, 3)
    x = _gaussian_rows(kx, fac.x_mean, fac.x_chol, batch)
    w = _matrix_normal(kw, fac.w_mean, fac.u_chol, fac.v_chol)
    n = fac.w_mean.shape[1]
    if fac.dy_mean is None:
      dy = jax.random.normal(kd, (batch, n), jnp.float32)
    else:
      dy = _gaussian_rows(kd, fac.dy_mean, fac.dy_chol, batch)
    return _site_meres(x, w, dy, candidates, metric)
  return jax.lax.map(one, keys)  # [S, C, 3]


def _estimates(meres: np.ndarray, candidates, confidence) -> SiteMere:
  return {c.name: {g: MereEstimate.from_values(meres[:, i, j], confidence) for j, g in enumerate(GEMMS)}
          for i, c in enumerate(candidates)}


def mere_for_site(key: jax.Array, x: Gaussian, w: MatrixNormal, dy: Gaussian | None = None, *,
                  candidates: Sequence[str | Candidate], num_samples: int = 64, batch: int = 256,
                  confidence: float = 0.95, jitter: float = 1e-6, metric: str = "mere") -> SiteMere:
  """MERE of each candidate's three GEMMs on `num_samples` synthetic (x [batch, K], w [K, N], dy [batch, N]).

  x rows ~ N(x.mean, x.cov), w ~ MN(w.mean, w.u, w.v), dy rows ~ N(dy.mean, dy.cov) or N(0, 1) when
  dy is None. Each sample draws all three afresh. Returns {candidate: {gemm: MereEstimate}}.
  For the N(0, 1) baseline pass Gaussian.standard(K), MatrixNormal.standard(K, N). `metric` names
  another score from METRICS (comparisons only; plans use "mere").
  """
  _metric(metric)
  if num_samples < 1 or batch < 1:
    raise ValueError(f"num_samples and batch must be positive, got {num_samples}, {batch}")
  cands = get_candidates(candidates)
  fac = _factor(x, w, dy, jitter)
  keys = jax.random.split(key, num_samples)
  meres = np.asarray(_sampled_meres(keys, fac, candidates=cands, batch=batch, metric=metric), np.float64)
  return _estimates(meres, cands, confidence)


@functools.partial(jax.jit, static_argnames=("candidates", "metric"), compiler_options=COMPILER_OPTIONS)
def _operand_meres(xs, w, dys, *, candidates, metric="mere"):
  if w.ndim == 2:
    return jax.lax.map(lambda t: _site_meres(t[0], w, t[1], candidates, metric), (xs, dys))
  return jax.lax.map(lambda t: _site_meres(*t, candidates, metric), (xs, w, dys))


def mere_on_operands(xs: jax.Array, w: jax.Array, dys: jax.Array | None = None, *,
                     candidates: Sequence[str | Candidate], key: jax.Array | None = None,
                     confidence: float = 0.95, metric: str = "mere") -> SiteMere:
  """MERE on real operands: xs [S, B, K] activation batches, w [K, N] (shared) or [S, K, N], dys
  [S, B, N] output gradients (None: N(0, 1) drawn with `key`). The interval is over the S samples."""
  _metric(metric)
  xs = jnp.asarray(xs, jnp.float32)
  w = jnp.asarray(w, jnp.float32)
  if (xs.ndim != 3 or w.ndim not in (2, 3) or xs.shape[2] != w.shape[-2]
      or (w.ndim == 3 and w.shape[0] != xs.shape[0])):
    raise ValueError(f"need xs [S, B, K] and w [K, N] or [S, K, N], got {xs.shape} and {w.shape}")
  s, b, _ = xs.shape
  n = w.shape[-1]
  if dys is None:
    if key is None:
      raise ValueError("mere_on_operands: pass dys or a key to draw N(0, 1) output gradients")
    dys = jax.random.normal(key, (s, b, n), jnp.float32)
  dys = jnp.asarray(dys, jnp.float32)
  if dys.shape != (s, b, n):
    raise ValueError(f"dys must be [S, B, N] = {(s, b, n)}, got {dys.shape}")
  cands = get_candidates(candidates)
  meres = np.asarray(_operand_meres(xs, w, dys, candidates=cands, metric=metric), np.float64)
  return _estimates(meres, cands, confidence)


# --------------------------------------------------------------------------------------------
# Guard against XLA folding the fake quantization away


def _dequantize_host(q: jax.Array, s: jax.Array, side: str, recipe: str) -> np.ndarray:
  """FP8 values q times their scales, in float64 on the host (the padded shape of q)."""
  q = np.asarray(q).astype(np.float64)
  s = np.asarray(s, np.float64)
  if recipe == "block":
    s = np.repeat(s, BLOCK, axis=1) if side == "lhs" else np.repeat(np.repeat(s, BLOCK, axis=0), BLOCK, axis=1)
  return q * s


def check_real_quantization(key: jax.Array, *, shape: tuple[int, int, int] = (64, 200, 96), tol: float = 1e-3,
                            compiler_options: dict | None = None) -> dict[str, float]:
  """Relative gap between the MERE the error model computes for each registry GEMM and the MERE of
  a host replay of that GEMM's rounding: {"candidate/gemm": |MERE_jit / MERE_host - 1|}.

  One site's operands x [M, K], w [K, N], dy [M, N] (shape = (M, K, N); K and M not multiples of
  128) go through the same jitted computation as mere_for_site (all candidates and the f32
  references in one function, only the MEREs leaving it), compiled with `compiler_options`
  (default COMPILER_OPTIONS; {} for XLA's defaults). The replay multiplies, in float64 with numpy,
  the bf16-rounded operands (ml_dtypes) or the materialised FP8 operands times their scales from
  quantize_lhs / quantize_rhs. A faithful computation agrees to f32 rounding (gap ~1e-5); one
  whose operand rounding the compiler removed is off by a large fraction of the MERE itself (0.29
  when one of two operands keeps full precision): a gap above `tol` raises RuntimeError.
  """
  options = COMPILER_OPTIONS if compiler_options is None else compiler_options
  m, k, n = shape
  kx, kr, kw, kd = jax.random.split(key, 4)
  x = jax.random.normal(kx, (m, k), jnp.float32) * jnp.exp(jax.random.normal(kr, (m, 1)))  # uneven rows
  w = jax.random.normal(kw, (k, n), jnp.float32)
  dy = jax.random.normal(kd, (m, n), jnp.float32)
  cands = get_candidates(["bf16", *(f"fp8_{r}" for r in RECIPES)])
  run = jax.jit(functools.partial(_site_meres, candidates=cands), compiler_options=options)
  got = np.asarray(run(x, w, dy), np.float64)  # [C, 3]
  quantize = {"lhs": jax.jit(quantize_lhs, static_argnums=(1, 2)), "rhs": jax.jit(quantize_rhs, static_argnums=(1, 2))}
  gaps = {}
  for j, (g, (a, b)) in enumerate(_gemm_operands(x, w, dy).items()):
    a, b = np.asarray(a), np.asarray(b)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    for i, c in enumerate(cands):
      if c.name == "bf16":
        host = a.astype(ml_dtypes.bfloat16).astype(np.float64) @ b.astype(ml_dtypes.bfloat16).astype(np.float64)
      else:
        recipe = c.name.removeprefix("fp8_")
        da, db = FP8_DTYPES[g]
        qa, sa = quantize["lhs"](a, da, recipe)
        qb, sb = quantize["rhs"](b, db, recipe)
        host = _dequantize_host(qa, sa, "lhs", recipe) @ _dequantize_host(qb, sb, "rhs", recipe)
        host = host[:a.shape[0], :b.shape[1]]  # block pads to multiples of 128
      want = np.abs(host - ref).sum() / np.abs(ref).sum()
      gaps[f"{c.name}/{g}"] = float(abs(got[i, j] / want - 1))
  bad = {k: v for k, v in gaps.items() if not v <= tol}
  if bad:
    raise RuntimeError(f"the jitted MERE disagrees with a host replay of the GEMMs' rounding (XLA excess "
                       f"precision folding it away?): {bad}")
  return gaps
