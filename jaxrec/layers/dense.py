"""Dense: a linear layer whose three GEMMs run in the numerics of an explicit `SitePrecision`.

x [..., K] -> [..., N] in `dtype`: y = x @ kernel (+ bias), kernel [K, N] and bias [N] f32
parameters with nnx.Linear's names, shapes, initialisers and rng draws (so parameter trees and
checkpoints are those of the nnx.Linear it replaces). x is cast to `dtype` first; the GEMMs run
through `jaxrec.ops.planned_dense` as `precision` says (forward, input gradient and weight
gradient each on its own); the bias is added in `dtype`. The default precision is the plain
path of `dtype` (`plain_precision`): exactly nnx.Linear(dtype=dtype), forward and backward.

A GEMM site is named by the module path of its Dense with dots ("top.layers.0",
"cross.layers.1.v"); `gemm_sites(model)` lists them, which is what a PrecisionPlan's keys must be.

>>> from flax import nnx
>>> from jaxrec.precision.plan import SitePrecision
>>> d = Dense(3, 4, precision=SitePrecision.uniform("fp8_row"), rngs=nnx.Rngs(0))
>>> d(jnp.ones((2, 3))).shape, gemm_sites(d)
((2, 4), [('', 3, 4)])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.ops.delayed_dense import delayed_dense, init_history
from jaxrec.ops.fp8_dense import fp8_gemm_nt_prequantized, quantize_weight_nk
from jaxrec.ops.fp8_scaling import E4M3
from jaxrec.ops.planned_dense import fuses, planned_dense
from jaxrec.precision.plan import PrecisionPlan, SitePrecision
from kernels_pallas.fp8_gemm_sm90 import epilogue_reference

DEFAULT_KERNEL_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_PLAIN = {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.bfloat16): "bf16"}


def plain_precision(dtype) -> SitePrecision:
  """The site precision of an ordinary layer computing in `dtype` (float32 or bfloat16)."""
  try:
    return SitePrecision.uniform(_PLAIN[jnp.dtype(dtype)])
  except KeyError:
    raise ValueError(f"Dense computes in float32 or bfloat16, got {jnp.dtype(dtype).name}") from None


def site_precision(plan: PrecisionPlan | None, name: str, dtype) -> SitePrecision:
  """The plan's precision for site `name`, or the plain path of `dtype` when there is no plan."""
  return plain_precision(dtype) if plan is None else plan.site(name)


class ProbeTap(nnx.Variable):
  """A zero [rows, N] added to a Dense's GEMM output while the Probe differentiates the loss with
  respect to it: its gradient is the GEMM's output gradient dy (`capture_gemm_operands`)."""


class FP8Meta(nnx.Variable):
  """An fp8_delayed site's amax history f32 [3, H] (x, w, dy; jaxrec.ops.delayed_dense): training
  state, not a parameter. The train state holds these apart from the parameters
  (jaxrec.training.state.split_model) and overwrites them with their "gradient" each step."""


class FP8Weight(nnx.Variable):
  """A kernel quantized once for inference (`Dense.prequantize`): state, not a trained parameter."""


class Dense(nnx.Module):

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype: jnp.dtype = jnp.float32, precision: SitePrecision | None = None,
               kernel_init: nnx.Initializer = DEFAULT_KERNEL_INIT, interpret: bool = False, rngs: nnx.Rngs):
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), jnp.float32))
    if use_bias:  # draws a key like nnx.Linear does, so later layers initialise identically
      self.bias = nnx.Param(nnx.initializers.zeros_init()(rngs.params(), (out_features,), jnp.float32))
    else:
      self.bias = nnx.data(None)
    self.in_features, self.out_features = in_features, out_features
    self.dtype = jnp.dtype(dtype)
    self.precision = plain_precision(dtype) if precision is None else precision
    if self.precision.is_delayed:
      self.fp8_meta = FP8Meta(init_history())
    self.interpret = interpret
    self.capture = False  # set by capture_gemm_inputs: record the GEMM input as an nnx.Intermediate

  def fuses(self, norm: str | None, activation: str | None) -> bool:
    """Whether __call__ can fuse act(norm(.)) into this layer's FP8 forward GEMM (no bias, fp8 fwd)."""
    return self.bias is None and fuses(self.precision, norm, activation)

  def __call__(self, x: jax.Array, *, norm: str | None = None, activation: str | None = None) -> jax.Array:
    """x [..., K] -> [..., N] in `dtype`; with norm / activation, act(norm(x @ kernel)) fused into
    the FP8 GEMM (only where `self.fuses(norm, activation)`; see jaxrec.ops.planned_dense)."""
    if (norm is not None or activation is not None) and not self.fuses(norm, activation):
      raise ValueError(f"this Dense cannot fuse norm={norm!r}, activation={activation!r} (bias: "
                       f"{self.bias is not None}, forward numerics {self.precision.fwd.numerics!r})")
    if x.ndim < 1 or x.shape[-1] != self.in_features:  # every path, the prequantized one included
      raise ValueError(f"Dense({self.in_features}, {self.out_features}) needs x [..., {self.in_features}], "
                       f"got shape {x.shape}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    if self.capture:
      self.probe_input = nnx.Intermediate(x2)
    fp8_kernel = getattr(self, "fp8_kernel", None)
    tap = getattr(self, "probe_tap", None)
    if self.precision.is_delayed:  # never fused (fuses() is False)
      y = delayed_dense(x2, self.kernel[...], self.fp8_meta[...], impl=self.precision.fwd.impl,
                        interpret=self.interpret)
    elif tap is not None:  # the Probe's backward pass: the GEMM unfused, the epilogue after the tap below
      y = planned_dense(x2, self.kernel[...], self.precision, interpret=self.interpret)
    elif fp8_kernel is not None:
      c = self.precision.fwd
      y = fp8_gemm_nt_prequantized(x2, fp8_kernel[...], self.fp8_scale[...], n=self.out_features, recipe=c.recipe,
                                   out_dtype=x2.dtype, impl=c.impl, interpret=self.interpret, norm=norm,
                                   activation=activation, rowwise_a=self.fp8_rowwise_inputs)
    else:
      y = planned_dense(x2, self.kernel[...], self.precision, norm=norm, activation=activation,
                        interpret=self.interpret)
    if tap is not None:  # dy is taken before the bias and the epilogue
      y = y + tap[...].astype(y.dtype)
      if norm is not None or activation is not None:
        y = epilogue_reference(y.astype(jnp.float32), norm=norm, activation=activation).astype(y.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y.reshape(*lead, self.out_features)

  def prequantize(self, *, rowwise_inputs: bool = False) -> bool:
    """For inference: quantizes the kernel once for this site's FP8 forward GEMM (the (N, K)
    layout of `jaxrec.ops.fp8_dense.quantize_weight_nk`), which later calls use instead of
    quantizing it per call. Same outputs (up to f32 summation order); no gradients through it,
    and the copy does not follow later changes of `kernel` (call it again after loading new
    weights). Returns False, doing nothing, where the forward GEMM is not fp8 or is fp8_delayed
    (whose weight scale comes from its amax history at each call).

    rowwise_inputs: an fp8_tensor site then scales its input per row, not by the amax of the whole
    batch, so that a row's output no longer depends on the other rows (a server's batch mixes
    requests; `fp8_gemm_nt_prequantized(rowwise_a=True)`); the outputs then differ from the
    per-call forward's by FP8 rounding. fp8_row and fp8_block sites already scale it per row."""
    c = self.precision.fwd
    if not c.is_fp8 or c.is_delayed:
      return False
    q, s = quantize_weight_nk(self.kernel[...].T, recipe=c.recipe, dtype=E4M3, impl=c.impl, interpret=self.interpret)
    self.fp8_kernel, self.fp8_scale = FP8Weight(q), FP8Weight(s)
    self.fp8_rowwise_inputs = rowwise_inputs
    return True


def prequantize_fp8_weights(model: nnx.Module, *, rowwise_inputs: bool = False) -> list[str]:
  """Dense.prequantize on every GEMM site of `model` (inference); returns the sites it quantized."""
  return [name for name, m in dense_modules(model) if m.prequantize(rowwise_inputs=rowwise_inputs)]


def dense_modules(model: nnx.Module) -> list[tuple[str, Dense]]:
  """(site name, Dense) for every Dense in `model`, in nnx's traversal order."""
  return [(".".join(str(p) for p in path), m) for path, m in nnx.iter_modules(model) if isinstance(m, Dense)]


def gemm_sites(model: nnx.Module) -> list[tuple[str, int, int]]:
  """(site name, K, N) of every Dense GEMM site of `model`: the names a PrecisionPlan may use."""
  return [(name, m.in_features, m.out_features) for name, m in dense_modules(model)]


def capture_gemm_inputs(model: nnx.Module, fn) -> tuple[object, dict[str, jax.Array]]:
  """Runs `fn(model)` with every Dense recording its GEMM input; returns (fn's result,
  {site: x [rows, K]}). For LoKA's Probe; call it on a model merged inside a jitted function."""
  mods = dense_modules(model)
  for _, m in mods:
    m.capture = True
  try:
    out = fn(model)
  finally:
    for _, m in mods:
      m.capture = False
  acts = {}
  for name, m in mods:
    v = getattr(m, "probe_input", None)
    if v is None:
      raise ValueError(f"GEMM site {name!r} did not run in the probed forward pass")
    acts[name] = v[...]
    del m.probe_input
  return out, acts


def capture_gemm_operands(model: nnx.Module, loss_fn) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
  """One forward and backward pass of `loss_fn(model)` (a scalar) recording each Dense site's GEMM
  operands: returns (loss, {site: x [rows, K]}, {site: dy [rows, N]}), dy being
  d loss / d (x @ kernel), before the bias and before a fused epilogue (which this pass computes
  unfused: the GEMM result is rounded to the compute dtype before it). For LoKA's Probe. The pass
  runs on a copy of `model` (nnx.split / merge), which is left as it was; it is traced twice, once
  for the row counts."""
  graphdef, state = nnx.split(model)
  outs = {name: m.out_features for name, m in dense_modules(model)}

  def run(taps):
    copy = nnx.merge(graphdef, state)
    if taps is not None:
      for name, m in dense_modules(copy):
        m.probe_tap = ProbeTap(taps[name])
    return capture_gemm_inputs(copy, loss_fn)

  shapes = jax.eval_shape(lambda: run(None))[1]
  zeros = {s: jnp.zeros((shapes[s].shape[0], outs[s]), jnp.float32) for s in outs}
  (loss, acts), dys = jax.value_and_grad(run, has_aux=True)(zeros)
  return loss, acts, dys
