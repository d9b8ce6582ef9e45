"""Mesh and sharding rules for data-parallel training with row-sharded embedding tables.

One mesh axis, "data", over all local devices. The batch is split along it; dense parameters
and their optimizer state are replicated; the fused embedding table and its row-wise Adagrad
accumulator are split by rows along the same axis (each device holds R / n rows). XLA's SPMD
partitioner turns the lookup into a masked local gather plus a reduction and routes the sparse
update to the owning shard.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


class MeshError(ValueError):
  """More devices asked for than there are, or a batch size the mesh cannot split evenly."""


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh named "data" over the first `num_devices` local devices (default: all)."""
  devices = jax.local_devices()
  n = len(devices) if num_devices in (None, 0) else num_devices
  if not 1 <= n <= len(devices):
    raise MeshError(f"asked for {n} devices, {len(devices)} are available (--train.num_devices; 0 = all)")
  return Mesh(np.array(devices[:n]), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def row_sharded(mesh: Mesh) -> NamedSharding:
  """Split the leading (row / batch) dimension over the data axis."""
  return NamedSharding(mesh, P(AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "--data.batch_size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise MeshError(f"{what}={batch_size} must be a multiple of the {n} devices in the mesh")


def training_mesh(num_devices: int | None, batch_size: int, eval_batch_size: int, flags: str = "--data") -> Mesh:
  """make_mesh(num_devices), with the training and eval batch sizes checked to split over it
  (MeshError naming FLAGS.batch_size / FLAGS.eval_batch_size)."""
  mesh = make_mesh(num_devices)
  check_batch_size(batch_size, mesh, f"{flags}.batch_size")
  check_batch_size(eval_batch_size, mesh, f"{flags}.eval_batch_size")
  return mesh
