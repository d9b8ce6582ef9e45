"""The ranker's probabilities over serving rows: the one forward every compiled serving step runs.

Serving rows carry no labels, weights, domains or timestamps; they are filled with zeros to make a
`Batch` (the model reads only dense, sparse and sparse_mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.data.batch import Batch, Schema
from jaxrec.training.state import merge_state


def ranker_probs(graphdef: nnx.GraphDef, schema: Schema, state, dense: jax.Array, sparse: jax.Array,
                 sparse_mask: jax.Array) -> jax.Array:
  """probs f32 [B, T] of the ranker (`state.params`, `state.table`) on dense [B, Fd], sparse and
  sparse_mask [B, Fs, L]."""
  b = dense.shape[0]
  zeros = jnp.zeros((b,), jnp.int32)
  batch = Batch(dense=dense, sparse=sparse, sparse_mask=sparse_mask,
                labels=jnp.zeros((b, schema.num_tasks), jnp.float32), weights=jnp.zeros((b,), jnp.float32),
                domain=zeros, timestamp=zeros)
  return jax.nn.sigmoid(merge_state(graphdef, state)(batch).astype(jnp.float32))
