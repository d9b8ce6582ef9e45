"""A DCNv2-style ranker (Wang et al. 2021; MLPerf DLRMv2 layout).

    dense [B, Fd] --bottom MLP--> [B, D] --+
    sparse [B, Fs, L] --fused table, pool--> [B, Fs, D] --+--concat--> x0 [B, (Fs+1) D]
    x0 --cross network (num_cross layers, low-rank `cross_rank`)--> --top MLP--> --heads--> logits [B, T]

With no dense features the bottom MLP is skipped and x0 is [B, Fs D].

Every MLP and cross-network projection is a `jaxrec.layers.Dense`, a GEMM site named by its module
path ("bottom.layers.0", "cross.layers.1.u", "cross.layers.1.v", "top.layers.2"; `gemm_sites`
lists them with their K and N). A `PrecisionPlan` passed at construction sets each site's forward,
input-gradient and weight-gradient numerics; without one every GEMM runs plainly in
`compute_dtype`. The prediction heads stay f32 and are not sites.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.data.batch import Batch, Schema
from jaxrec.layers import MLP, CrossNetwork, FusedEmbedding, MultiTaskHeads, pool, table_configs
from jaxrec.layers.dense import dense_modules, gemm_sites
from jaxrec.layers.mlp import ACTIVATIONS
from jaxrec.precision.plan import PrecisionPlan


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
  norm: Literal["none", "layer", "block"] = "none"
  """normalisation before each MLP activation: none, layer (LayerNorm; the LoKA baseline is bias,
  layer, silu) or block (BlockNorm: parameter-free RMS norm over 256-feature blocks; LoKA's Mod)"""
  block_norm: bool = False
  """older spelling of norm=block (kept so existing commands run); conflicts with norm=layer"""
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

  def __post_init__(self):
    for name in ("embed_dim", "hash_rows", "max_rows_per_feature"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.dcnv2.{name} must be >= 1, got {getattr(self, name)}")
    if any(w < 1 for w in self.bottom_mlp + self.top_mlp):
      raise ValueError(f"model.dcnv2.bottom_mlp and top_mlp widths must be >= 1, got {self.bottom_mlp}, "
                       f"{self.top_mlp}")
    if not self.top_mlp:
      raise ValueError("model.dcnv2.top_mlp needs at least one hidden size")
    if self.num_cross < 0 or (self.cross_rank is not None and self.cross_rank < 1):
      raise ValueError(f"model.dcnv2.num_cross must be >= 0 and cross_rank >= 1 (or none), got "
                       f"{self.num_cross}, {self.cross_rank}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"model.dcnv2.activation must be one of {', '.join(sorted(ACTIVATIONS))}, got "
                       f"{self.activation!r}")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"model.dcnv2.compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
    if self.combiner not in ("sum", "mean"):
      raise ValueError(f"model.dcnv2.combiner must be sum or mean, got {self.combiner!r}")
    if self.embedding_init < 0:
      raise ValueError(f"model.dcnv2.embedding_init must be >= 0, got {self.embedding_init}")
    if self.norm not in ("none", "layer", "block"):
      raise ValueError(f"model.dcnv2.norm must be none, layer or block, got {self.norm!r}")
    if self.block_norm and self.norm == "layer":
      raise ValueError("model.dcnv2.block_norm=true means norm=block and conflicts with norm=layer; "
                       "pass only --model.dcnv2.norm")

  @property
  def mlp_norm(self) -> str:
    """The MLPs' norm, block_norm=true folded in: none, layer or block."""
    return "block" if self.block_norm else self.norm


class DCNv2Ranker(nnx.Module):
  """plan: the numerics of each GEMM site (see `gemm_sites`: "bottom.layers.<i>",
  "cross.layers.<l>.u|v", "top.layers.<i>"; the heads stay f32 and are no site). None = every GEMM
  plainly in compute_dtype. A plan naming sites this model does not have is a ValueError."""

  def __init__(self, schema: Schema, cfg: DCNv2Config, *, row_multiple: int = 1,
               plan: PrecisionPlan | None = None, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.compute_dtype)
    self.combiner = cfg.combiner
    self.dtype = dtype
    self.embedding = FusedEmbedding(
        table_configs(schema.sparse, dim=cfg.embed_dim, hash_rows=cfg.hash_rows,
                      max_rows_per_feature=cfg.max_rows_per_feature),
        row_multiple=row_multiple, init_scale=cfg.embedding_init or None, rngs=rngs)
    d = cfg.embed_dim
    if schema.num_dense:
      self.bottom = MLP(schema.num_dense, tuple(cfg.bottom_mlp) + (d,), act=cfg.activation, use_bias=cfg.use_bias,
                        norm=cfg.mlp_norm, dtype=dtype, plan=plan, path="bottom", rngs=rngs)
      x_dim = (schema.num_sparse + 1) * d
    else:
      self.bottom = None
      x_dim = schema.num_sparse * d
    self.cross = CrossNetwork(x_dim, cfg.num_cross, rank=cfg.cross_rank, use_bias=cfg.use_bias, dtype=dtype,
                              plan=plan, path="cross", rngs=rngs)
    self.top = MLP(x_dim, tuple(cfg.top_mlp), act=cfg.activation, use_bias=cfg.use_bias, norm=cfg.mlp_norm,
                   dtype=dtype, plan=plan, path="top", rngs=rngs)
    self.heads = MultiTaskHeads(cfg.top_mlp[-1] if cfg.top_mlp else x_dim, schema.num_tasks, rngs=rngs)
    if plan is not None:
      plan.check_sites(gemm_sites(self))
      for name, layer in dense_modules(self):  # the blocks named their sites themselves: they must be the module paths
        if layer.precision != plan.site(name):
          raise AssertionError(f"GEMM site {name!r} was built with another site's precision")

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
