"""The jitted probe step: one forward and backward pass of the training loss that records every
GEMM site's input, weight and output gradient and merges them into the Probe's statistics
(jaxrec.precision.probe.ProbeState).

The training loop runs it on the current batch every `ProbeConfig.every` steps; its cost is
measured by the loop (summary.json `probe_seconds`, `probe_overhead`).
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from flax import nnx

from jaxrec.data.batch import Batch
from jaxrec.layers.dense import capture_gemm_operands, dense_modules, gemm_sites
from jaxrec.precision.probe import ProbeConfig, ProbeState
from jaxrec.training.losses import weighted_bce
from jaxrec.training.state import TrainState, merge_state


def init_probe_state(graphdef: nnx.GraphDef, state: TrainState, cfg: ProbeConfig, mesh: Mesh) -> ProbeState:
  """Empty statistics for every GEMM site of the model, replicated over `mesh`."""
  probe = ProbeState.init(gemm_sites(merge_state(graphdef, state)), cfg.weight_decay)
  return place(probe, mesh)


def place(probe: ProbeState, mesh: Mesh) -> ProbeState:
  """The statistics replicated over `mesh` (the probe step's input and output sharding)."""
  return jax.device_put(probe, NamedSharding(mesh, PartitionSpec()))


def make_probe_step(graphdef: nnx.GraphDef, cfg: ProbeConfig,
                    mesh: Mesh) -> Callable[[ProbeState, TrainState, Batch], ProbeState]:
  """probe_step(probe_state, train_state, batch) -> probe_state (jitted; probe_state donated and
  kept replicated over `mesh`, so every call after the first reuses one compilation)."""

  def probe_step(probe: ProbeState, state: TrainState, batch: Batch) -> ProbeState:
    model = merge_state(graphdef, state)
    _, acts, dys = capture_gemm_operands(model, lambda m: weighted_bce(m(batch), batch.labels, batch.weights))
    weights = {name: m.kernel[...] for name, m in dense_modules(model)}
    return probe.update(acts, weights, cfg.max_rows, dys)

  return jax.jit(probe_step, donate_argnums=0, out_shardings=NamedSharding(mesh, PartitionSpec()))
