"""BlockNorm (LoKA's Mod): parameter-free RMS normalisation over fixed blocks of features.

x [..., F] is split into F / block contiguous blocks (block = 256 by default, or F itself when
F < block) and each block is divided by its root mean square:

    y[..., b, :] = x[..., b, :] / sqrt(mean(x[..., b, :] ** 2) + eps)

No learned parameters, and the same computation at training and serving time, so it can be
fused into an FP8 GEMM epilogue. F must be a multiple of the block.

>>> import jax.numpy as jnp
>>> y = block_norm(jnp.arange(1.0, 9.0).reshape(1, 8), block=4)
>>> [round(float(v), 3) for v in y[0, :4]]
[0.365, 0.73, 1.095, 1.461]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 256


def block_norm(x: jax.Array, *, block: int = BLOCK, eps: float = 1e-6) -> jax.Array:
  f = x.shape[-1]
  b = min(block, f)
  if f % b:
    raise ValueError(f"block_norm: feature width {f} is not a multiple of the block ({b})")
  xb = x.astype(jnp.float32).reshape(*x.shape[:-1], f // b, b)
  y = xb * jax.lax.rsqrt(jnp.mean(xb * xb, axis=-1, keepdims=True) + eps)
  return y.reshape(x.shape).astype(x.dtype)
