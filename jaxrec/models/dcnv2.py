"""A DCNv2-style ranker (Wang et al. 2021; MLPerf DLRMv2 layout).

    dense [B, Fd] --bottom MLP--> [B, D] --+
    sparse [B, Fs, L] --fused table, pool--> [B, Fs, D] --+--concat--> x0 [B, (Fs+1) D]
    x0 --cross network (num_cross layers, low-rank `cross_rank`)--> --top MLP--> --heads--> logits [B, T]

With no dense features the bottom MLP is skipped and x0 is [B, Fs D].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.data.batch import Batch, Schema
from jaxrec.layers import MLP, CrossNetwork, FusedEmbedding, MultiTaskHeads, pool, table_configs


@dataclasses.dataclass(frozen=True)
class DCNv2Config:
  embed_dim: int = 16
  """width D of every embedding (and of the bottom MLP's output)"""
  bottom_mlp: tuple[int, ...] = (64,)
  """hidden sizes of the bottom MLP over dense features; a final layer of width D is added"""
  num_cross: int = 3
  """number of DCNv2 cross layers"""
  cross_rank: int | None = None
  """low-rank size of each cross layer (None = full rank)"""
  top_mlp: tuple[int, ...] = (256, 128)
  """hidden sizes of the top MLP before the per-task heads"""
  activation: str = "relu"
  """activation of the MLPs: relu, silu, gelu, hard_swish (LoKA's Mod: hard_swish)"""
  use_bias: bool = True
  """biases in the MLP and cross layers (LoKA's NoBias Mod: False; the prediction heads keep theirs)"""
  block_norm: bool = False
  """BlockNorm (parameter-free RMS norm over 256-feature blocks) before each MLP activation (LoKA's Mod)"""
  hash_rows: int = 1 << 17
  """rows per feature for raw-hash features (and vocabularies over max_rows_per_feature)"""
  max_rows_per_feature: int = 1 << 20
  """vocabularies up to this size get one row per id; larger ones are hashed"""
  compute_dtype: str = "float32"
  """dtype of the matmuls and activations: float32 or bfloat16 (parameters stay float32)"""
  embedding_init: float = 0.0
  """embedding rows start uniform in [-s, s] with this s (0 = 1/sqrt(embed_dim)); a small s keeps
  rarely seen ids near zero instead of at random positions, which matters on small datasets"""
  combiner: str = "sum"
  """how multi-id features pool their rows: sum or mean"""


class DCNv2Ranker(nnx.Module):

  def __init__(self, schema: Schema, cfg: DCNv2Config, *, row_multiple: int = 1, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.compute_dtype)
    self.combiner = cfg.combiner
    self.dtype = dtype
    self.embedding = FusedEmbedding(
        table_configs(schema.sparse, dim=cfg.embed_dim, hash_rows=cfg.hash_rows,
                      max_rows_per_feature=cfg.max_rows_per_feature),
        row_multiple=row_multiple, init_scale=cfg.embedding_init or None, rngs=rngs)
    d = cfg.embed_dim
    if schema.num_dense:
      self.bottom = MLP(schema.num_dense, tuple(cfg.bottom_mlp) + (d,), act=cfg.activation,
                        use_bias=cfg.use_bias, block_norm=cfg.block_norm, dtype=dtype, rngs=rngs)
      x_dim = (schema.num_sparse + 1) * d
    else:
      self.bottom = None
      x_dim = schema.num_sparse * d
    self.cross = CrossNetwork(x_dim, cfg.num_cross, rank=cfg.cross_rank, use_bias=cfg.use_bias, dtype=dtype,
                              rngs=rngs)
    self.top = MLP(x_dim, tuple(cfg.top_mlp), act=cfg.activation, use_bias=cfg.use_bias,
                   block_norm=cfg.block_norm, dtype=dtype, rngs=rngs)
    self.heads = MultiTaskHeads(cfg.top_mlp[-1] if cfg.top_mlp else x_dim, schema.num_tasks, rngs=rngs)

  def from_pooled(self, dense: jax.Array, pooled: jax.Array) -> jax.Array:
    """Logits f32 [B, T] from dense [B, Fd] and pooled embeddings [B, Fs, D]."""
    b = pooled.shape[0]
    parts = [pooled.astype(self.dtype)]
    if self.bottom is not None:
      parts.insert(0, self.bottom(dense.astype(self.dtype))[:, None, :].astype(self.dtype))
    x0 = jnp.concatenate(parts, axis=1).reshape(b, -1)
    return self.heads(self.top(self.cross(x0)))

  def __call__(self, batch: Batch) -> jax.Array:
    """Logits f32 [B, T] for a Batch."""
    rows = self.embedding.gather(self.embedding.table[...], self.embedding.row_ids(batch.sparse))
    return self.from_pooled(batch.dense, pool(rows, batch.sparse_mask, self.combiner))
