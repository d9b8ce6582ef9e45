"""LoKA's Probe: online statistics of every GEMM site's operands during training.

Per GEMM site (a dense layer y = x @ w, named as in `jaxrec.precision.plan`):

    activations       x [B, K]   -> a streaming Gaussian over the K features (stats.Welford, f32)
    weight            w [K, N]   -> a matrix-normal tracked with an EMA (stats.MatrixNormalEMA)
    output gradients  dy [B, N]  -> a streaming Gaussian over the N outputs (stats.Welford, f32):
                                    the dgrad (dy @ w.T) and wgrad (x.T @ dy) GEMMs' operand

`ProbeConfig.every` sets the cadence: the training loop calls the (jitted) probe step on one batch
every `every` steps, so the Probe costs one extra forward and backward pass plus the statistics
updates per `every` training steps. dy is the gradient of the batch's training loss with respect
to the site's GEMM output (jaxrec.layers.dense.capture_gemm_operands). Statistics saved before dy
was probed load with no dy entries; the error model then draws dy from N(0, 1).

The statistics are an explicit pytree (`ProbeState`), saved next to the run as `probe_stats.npz`.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrec.precision.stats import MatrixNormalEMA, Welford


# what np.load of a missing, truncated, half-written or foreign probe_stats.npz raises
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile)


def spread_rows(v: jax.Array, max_rows: int) -> jax.Array:
  """At most `max_rows` rows of v [..., F] (flattened to rows), evenly spaced over all of them: a
  training batch's rows are sorted (in time, on the ads world), and its first `max_rows` covered only
  the earliest part of the period the batch spans."""
  v = v.reshape(-1, v.shape[-1])
  n = v.shape[0]
  return v if n <= max_rows else v[(np.arange(max_rows) * n) // max_rows]


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  every: int = 250
  """probe one batch every this many training steps (0 = off)"""
  max_rows: int = 512
  """rows of the probed batch fed to the activation (and dy) statistics, spread evenly over the batch
  (its rows come in time order on the ads world: the first ones would be its earliest quarter)"""
  weight_decay: float = 0.9
  """EMA decay of the weights' matrix-normal estimate"""

  def __post_init__(self):
    if self.every < 0 or self.max_rows < 2:
      raise ValueError(f"probe.every must be >= 0 and probe.max_rows >= 2, got {self.every}, {self.max_rows}")
    if not 0.0 <= self.weight_decay < 1.0:
      raise ValueError(f"probe.weight_decay must be in [0, 1), got {self.weight_decay}")


@struct.dataclass
class ProbeState:
  acts: dict[str, Welford]
  weights: dict[str, MatrixNormalEMA]
  updates: jax.Array  # i32 [], how many probe steps have run
  grads: dict[str, Welford] = struct.field(default_factory=dict)  # {} in statistics saved before dy was probed

  @classmethod
  def init(cls, sites: list[tuple[str, int, int]], weight_decay: float = 0.9) -> "ProbeState":
    """Empty statistics for sites [(name, K, N)]."""
    return cls({name: Welford.init(k) for name, k, _ in sites},
               {name: MatrixNormalEMA.init(jnp.zeros((k, n)), weight_decay) for name, k, n in sites},
               jnp.zeros((), jnp.int32), {name: Welford.init(n) for name, _, n in sites})

  def update(self, acts: dict[str, jax.Array], weights: dict[str, jax.Array], max_rows: int,
             grads: dict[str, jax.Array] | None = None) -> "ProbeState":
    """Merges one probed batch: acts {site: x [B, K]}, weights {site: w [K, N]}, grads {site: dy [B, N]}
    (needed when this state tracks dy; jit-friendly)."""
    grads = {} if grads is None else grads
    missing = sorted((set(self.acts) - set(acts)) | (set(self.weights) - set(weights))
                     | (set(self.grads) - set(grads)))
    if missing:
      raise ValueError(f"probe update lacks GEMM sites {missing}")
    rows = lambda v: spread_rows(v, max_rows)  # noqa: E731
    new_acts = {s: self.acts[s].update(rows(acts[s])) for s in self.acts}
    new_grads = {s: self.grads[s].update(rows(grads[s])) for s in self.grads}
    new_w = {}
    for s, ema in self.weights.items():
      w = weights[s].astype(jnp.float32)
      # the first update starts the EMA at the weight itself (its mean would otherwise be 0)
      start = MatrixNormalEMA(w, ema.u, ema.v, ema.decay)
      new_w[s] = jax.lax.cond(self.updates == 0, lambda: start, lambda: ema.update(w))
    return ProbeState(new_acts, new_w, self.updates + 1, new_grads)

  def save(self, path: str | Path, step: int | None = None) -> None:
    """Writes the statistics to `path` (probe_stats.npz), replacing it atomically; `step`: the
    training step they belong to (the checkpoint saved beside them), read back by `saved_step`."""
    arrays = {"updates": np.asarray(self.updates)}
    if step is not None:
      arrays["step"] = np.asarray(step, np.int64)
    for s, w in self.acts.items():
      arrays.update({f"act/{s}/count": w.count, f"act/{s}/mean": w.mean, f"act/{s}/m2": w.m2})
    for s, e in self.weights.items():
      arrays.update({f"w/{s}/mean": e.mean, f"w/{s}/u": e.u, f"w/{s}/v": e.v})
    for s, w in self.grads.items():
      arrays.update({f"dy/{s}/count": w.count, f"dy/{s}/mean": w.mean, f"dy/{s}/m2": w.m2})
    # atomic (temporary file, then rename): a run killed while saving keeps the statistics saved last
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)

  @staticmethod
  def saved_step(path: str | Path) -> int | None:
    """The training step `save` was given for the statistics at `path` (None: not recorded)."""
    try:
      with open(path, "rb") as f:
        z = np.load(f)
        return int(z["step"]) if hasattr(z, "files") and "step" in z.files else None
    except _UNREADABLE:
      return None

  @classmethod
  def load(cls, path: str | Path, weight_decay: float = 0.9) -> "ProbeState":
    """The statistics `save` wrote; ValueError when the file is missing, truncated or incomplete."""
    try:
      with open(path, "rb") as f:
        z = np.load(f)
        if not hasattr(z, "files") or "updates" not in z.files:
          raise ValueError("no Probe statistics in it")
        sites = sorted({k.split("/")[1] for k in z.files if k.startswith("act/")})
        acts = {s: Welford(jnp.asarray(z[f"act/{s}/count"]), jnp.asarray(z[f"act/{s}/mean"]),
                           jnp.asarray(z[f"act/{s}/m2"])) for s in sites}
        weights = {s: MatrixNormalEMA(jnp.asarray(z[f"w/{s}/mean"]), jnp.asarray(z[f"w/{s}/u"]),
                                      jnp.asarray(z[f"w/{s}/v"]), weight_decay) for s in sites}
        grads = {s: Welford(jnp.asarray(z[f"dy/{s}/count"]), jnp.asarray(z[f"dy/{s}/mean"]),
                            jnp.asarray(z[f"dy/{s}/m2"])) for s in sites if f"dy/{s}/count" in z.files}
        updates = jnp.asarray(z["updates"])
    except _UNREADABLE as e:
      raise ValueError(f"{path}: not a probe_stats.npz of python -m train.ranker --probe.every N ({e})") from None
    return cls(acts, weights, updates, grads)
