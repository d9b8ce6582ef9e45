"""fp8_quantize_sm90 against its jnp reference, through jax's Mosaic GPU interpreter on CPU.

Quantization is a definition, not an approximation: the kernel and the reference compute the same
amax (a max is exact in any order), the same scale (amax * f32(1 / fmax)), the correctly rounded
x / scale, clip and round-to-nearest-even cast, so q and the scales must agree bit for bit; any
tolerance would hide an off-by-one-ulp scale that moves every q of its row. Inputs next to fp8
rounding ties check the division itself. The reference in turn is checked bit for bit against
jaxrec.ops.fp8_scaling.quantize_lhs, the recipe the rest of jaxrec uses. No gradient check:
quantization has no useful derivative (fp8_dense defines its own VJP around it).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.ops.fp8_scaling import quantize_lhs, quantize_rhs
from kernels_pallas.fp8_quantize_sm90 import (TuningConfig, _inv_fmax, fp8_quantize,
                                               fp8_quantize_reference)

on_gpu = any(d.platform == "gpu" for d in jax.devices())
BF16, F32 = jnp.bfloat16, jnp.float32
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def sample(m, k, in_dtype, seed):
  """Activations with realistic spread: per-row magnitudes over decades, two outlier columns, a
  row far beyond the fp8 range before scaling, a tiny row, a zero row and a zero 128-block."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(m, k)) * rng.lognormal(0.0, 2.0, size=(m, 1))
  x[:, rng.choice(k, min(2, k), replace=False)] *= 50.0
  if m > 1:
    big, tiny, zero, blk = rng.choice(m, 4, replace=m < 4)
    x[big] *= 1e4  # |x| up to ~1e6: beyond e4m3 (448) and e5m2 (57344)
    x[tiny] *= 1e-6
    x[blk, : min(k, 128)] = 0.0  # a zero-amax block inside a non-zero row
    x[zero] = 0.0
  return jnp.asarray(x, in_dtype)


def bits(a):
  a = np.asarray(a)
  return a.view({1: np.uint8, 4: np.uint32}[a.dtype.itemsize])


def same(got, want) -> bool:
  """Bitwise equality of (q, scale) pairs, shapes included."""
  return all(g.shape == w.shape and g.dtype == w.dtype and np.array_equal(bits(g), bits(w))
             for g, w in zip(got, want, strict=True))


@functools.partial(jax.jit, static_argnums=(1, 2))
def lhs_reference(x, dtype, recipe):
  """quantize_lhs, jitted as in a train step (XLA rewrites its amax / fmax into amax * (1 / fmax)
  when compiling it whole; eager dispatch can skip that rewrite for a single row), with the row
  scale [M, 1] flattened to the kernel's [M]."""
  q, s = quantize_lhs(x, dtype, recipe)
  return q, (s[:, 0] if recipe == "row" else s)


@pytest.mark.parametrize("m,k", [(1, 128), (3, 200), (100, 1000)])
@pytest.mark.parametrize("in_dtype", [BF16, F32])
def test_reference_is_quantize_lhs(m, k, in_dtype):
  """Bitwise on random data (on XLA:CPU, quantize_lhs's row recipe may differ from the correctly
  rounded division next to fp8 rounding ties, about 1 element in 10^7; module docstring)."""
  x = sample(m, k, in_dtype, seed=m * k)
  for dtype in (E4M3, E5M2):
    for recipe in ("row", "block"):
      assert same(fp8_quantize_reference(x, recipe=recipe, dtype=dtype), lhs_reference(x, dtype, recipe))


# a sampled grid: every dtype pair and recipe, tile-aligned and awkward M (1, not a multiple of the
# row tile) and K (not a multiple of 128), one and several programs, fori and unrolled K loops
GRID = [
    (64, 256, BF16, E4M3, "row"),
    (64, 256, BF16, E4M3, "block"),
    (1, 128, BF16, E5M2, "row"),
    (1, 200, F32, E4M3, "block"),
    (100, 384, F32, E4M3, "row"),
    (100, 384, BF16, E5M2, "block"),
    (24, 200, BF16, E4M3, "row"),
    (24, 1000, F32, E5M2, "block"),
    (136, 1024, BF16, E4M3, "row"),
    (16, 4096, F32, E4M3, "block"),
    (256, 128, F32, E5M2, "row"),
    (40, 640, BF16, E5M2, "row"),
]


@pytest.mark.parametrize("m,k,in_dtype,dtype,recipe", GRID)
def test_kernel_matches_reference_bitwise(m, k, in_dtype, dtype, recipe):
  x = sample(m, k, in_dtype, seed=7 * m + k)
  got = fp8_quantize(x, recipe=recipe, dtype=dtype, interpret=not on_gpu)
  want = fp8_quantize_reference(x, recipe=recipe, dtype=dtype)
  assert same(got, want)
  assert not np.isnan(np.asarray(got[0], np.float32)).any()  # the clip ran before the cast


@pytest.mark.parametrize("recipe", ["row", "block"])
def test_explicit_tile_jit_and_k_major_scales(recipe):
  """block_m=16 over M=136 (padded to 144), 5 chunks with unroll=3 (a remainder), under jit."""
  x = sample(136, 640, BF16, seed=11)
  fn = jax.jit(functools.partial(fp8_quantize, recipe=recipe, config=TuningConfig(block_m=16, unroll=3),
                                 k_major_scales=recipe == "block", interpret=not on_gpu))
  q, s = fn(x)
  q_ref, s_ref = fp8_quantize_reference(x, recipe=recipe)
  assert same((q, s), (q_ref, s_ref if recipe == "row" else s_ref.T))


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_scale_is_what_xla_makes_of_amax_over_fmax(dtype):
  """The kernel computes scale = amax * f32(1 / fmax) because XLA compiles quantize_lhs's
  amax / fmax into exactly that (a Mosaic divide would differ in the last bit for about half of
  all rows on the GPU, where the interpreter cannot show it). If XLA stops rewriting, this fails."""
  amax = jnp.asarray(np.abs(np.random.default_rng(1).normal(size=4096)).astype(np.float32) * 100)
  fmax = float(jnp.finfo(dtype).max)
  xla = jax.jit(lambda a: a / fmax)(amax)
  assert np.array_equal(bits(xla), bits(amax * _inv_fmax(dtype)))
  assert not np.array_equal(bits(xla), bits(np.asarray(amax) / np.float32(fmax)))


def near_ties(m, k, seed):
  """f32 rows whose x / scale fall within 2 ulp of e4m3 rounding ties (midpoints of adjacent
  e4m3 values); every 128-block starts with 448 * s so row and block scales are both ~s. Here
  x / scale and x * (1 / scale) round to different fp8 values for a few percent of elements."""
  rng = np.random.default_rng(seed)
  grid = np.unique(np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32))
  grid = grid[np.isfinite(grid) & (grid > 0)]
  ties = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
  x = np.empty((m, k), np.float32)
  for r in range(m):
    s = np.float32(rng.uniform(0.5, 4.0) * 2.0 ** rng.integers(-10, 10))
    near = (rng.choice(ties, k) * s).astype(np.float32).view(np.int32) + rng.integers(-2, 3, k).astype(np.int32)
    x[r] = near.view(np.float32) * rng.choice([-1.0, 1.0], k).astype(np.float32)
    x[r, ::128] = np.float32(448.0) * s
  return jnp.asarray(x)


@pytest.mark.parametrize("recipe", ["row", "block"])
def test_division_is_exact_near_rounding_ties(recipe):
  """q is the correctly rounded x / scale (numpy's IEEE f32 division, then a plain cast), not
  x * (1 / scale): XLA:CPU rewrites the jnp division into the latter (module docstring)."""
  x = near_ties(8, 384, seed=17)
  q_ref, s_ref = fp8_quantize_reference(x, recipe=recipe)
  s_full = np.asarray(s_ref)[:, :, None].repeat(128, 2).reshape(8, 384) if recipe == "block" else (
      np.asarray(s_ref)[:, None])
  q_numpy = jnp.asarray(np.clip(np.asarray(x) / s_full, -448, 448)).astype(E4M3)
  assert same((q_ref,), (q_numpy,))
  assert same(fp8_quantize(x, recipe=recipe, interpret=not on_gpu), (q_ref, s_ref))
  # the inputs have the power to tell a division from a reciprocal multiply
  q_recip = jnp.asarray(np.clip(np.asarray(x) * (np.float32(1) / s_full), -448, 448)).astype(E4M3)
  assert not same((q_recip,), (q_ref,))


def test_negative_control_wrong_operand_fails():
  x = sample(64, 256, BF16, seed=3)
  got = fp8_quantize(x, recipe="block", interpret=not on_gpu)
  wrong = x.at[5, 17].multiply(1000.0)  # one element: one block's scale and q change
  assert not same(got, fp8_quantize_reference(wrong, recipe="block"))
  assert same(got, fp8_quantize_reference(x, recipe="block"))


def test_weight_quantized_transposed_is_quantize_rhs():
  """The GEMM takes the weight as (N, K): row-quantizing W^T gives quantize_rhs(W, "row")."""
  w = sample(256, 128, F32, seed=5)  # W [K=256, N=128]
  qw, sw = fp8_quantize(w.T, recipe="row", interpret=not on_gpu)
  q_rhs, s_rhs = jax.jit(quantize_rhs, static_argnums=(1, 2))(w, E4M3, "row")
  assert qw.shape == (128, 256) and sw.shape == (128,)
  assert same((qw.T, sw), (q_rhs, s_rhs[0]))


def test_bad_inputs_are_clear():
  x = jnp.ones((8, 128), BF16)
  with pytest.raises(ValueError, match="recipe must be one of"):
    fp8_quantize(x, recipe="tensor", interpret=True)
  with pytest.raises(ValueError, match=r"x \[M, K\]"):
    fp8_quantize(jnp.ones((2, 8, 128), BF16), interpret=True)
  with pytest.raises(ValueError, match="bfloat16 or float32"):
    fp8_quantize(jnp.ones((8, 128), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="float8_e4m3fn or float8_e5m2"):
    fp8_quantize(x, dtype=jnp.float16, interpret=True)
  with pytest.raises(ValueError, match="block recipe only"):
    fp8_quantize(x, recipe="row", k_major_scales=True, interpret=True)
  for bad in (6, 0, 260):
    with pytest.raises(ValueError, match=r"multiple of 4 in \[4, 256\]"):
      TuningConfig(block_m=bad)
  with pytest.raises(ValueError, match="multiple of 8"):
    fp8_quantize(x, config=TuningConfig(block_m=12), interpret=True)
  with pytest.raises(ValueError, match="lower block_m"):
    fp8_quantize(jnp.ones((256, 8192), BF16), config=TuningConfig(block_m=256), interpret=True)


@pytest.mark.parametrize("in_dtype,k", [(BF16, 8448), (F32, 10240)])
def test_k_too_large_for_shared_memory_raises(in_dtype, k):
  with pytest.raises(NotImplementedError, match="too large.*shared memory"):
    fp8_quantize(jnp.ones((8, k), in_dtype), interpret=True)


@pytest.mark.parametrize("recipe,in_dtype,m,k", [("row", BF16, 4096, 4096), ("block", F32, 100, 1000)])
def test_lowers_for_sm90(recipe, in_dtype, m, k):
  """The interpreter ignores register layouts and TMA limits; exporting for CUDA runs the real
  Mosaic GPU lowering (layout inference, copies, reductions) on this CPU, up to PTX."""
  fn = jax.jit(functools.partial(fp8_quantize, recipe=recipe, dtype=E5M2))
  exported = jax.export.export(fn, platforms=["cuda"])(jax.ShapeDtypeStruct((m, k), in_dtype))
  assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs an NVIDIA Hopper GPU (compiled Mosaic GPU kernel)")
@pytest.mark.parametrize("recipe", ["row", "block"])
@pytest.mark.parametrize("in_dtype", [BF16, F32])
def test_compiled_on_gpu_matches_reference_bitwise(recipe, in_dtype):
  x = sample(4096, 1024, in_dtype, seed=13)
  got = jax.jit(functools.partial(fp8_quantize, recipe=recipe))(x)
  with jax.default_device(jax.devices("cpu")[0]):  # the definition, evaluated by XLA:CPU
    want = fp8_quantize_reference(jax.device_put(x, jax.devices("cpu")[0]), recipe=recipe)
  assert same(got, want)


@pytest.mark.parametrize("recipe", ["row", "block"])
def test_tiny_amax_rows_quantize_without_nan(recipe):
  """A row (or block) whose amax is below fmax * smallest normal f32 (~5e-36 for e4m3, 7e-34 for
  e5m2) has a subnormal amax / fmax, which XLA:CPU flushes to 0: the scale is clamped to the
  smallest normal, so its zeros stay 0 (not 0 / 0 = NaN) and the kernel agrees bit for bit."""
  x = np.zeros((8, 200), np.float32)
  x[0, 0], x[1, :] = 1e-37, 3e-36
  x[2, 5], x[3, 130] = 1e-40, -2e-35  # subnormal input; a second block
  x[4:] = np.random.default_rng(0).normal(size=(4, 200))
  x = jnp.asarray(x)
  for dtype in (E4M3, E5M2):
    want = fp8_quantize_reference(x, recipe=recipe, dtype=dtype)
    assert not np.isnan(np.asarray(want[0], np.float32)).any()
    assert np.all(np.asarray(want[1]) > 0)
    assert same(want, lhs_reference(x, dtype, recipe))
    assert same(fp8_quantize(x, recipe=recipe, dtype=dtype, interpret=not on_gpu), want)
