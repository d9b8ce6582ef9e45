"""ModelConfig: which ranker to build, and `build_model` that builds it for a schema."""

from __future__ import annotations

import dataclasses
from typing import Literal

from flax import nnx

from jaxrec.data.batch import Schema
from jaxrec.models.dcnv2 import DCNv2Config, DCNv2Ranker
from jaxrec.models.logreg import LogisticRegression, LogRegConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  kind: Literal["dcnv2", "logreg"] = "dcnv2"
  """dcnv2 (embeddings + cross network + MLP) or logreg (the no-interaction baseline)"""
  seed: int = 0
  """seed of the parameter initialisation"""
  dcnv2: DCNv2Config = DCNv2Config()
  logreg: LogRegConfig = LogRegConfig()


def build_model(schema: Schema, cfg: ModelConfig, *, row_multiple: int = 1) -> DCNv2Ranker | LogisticRegression:
  """A freshly initialised model. Every model has `.embedding` (a FusedEmbedding), `.combiner`
  and `.from_pooled(dense, pooled) -> logits [B, T]`."""
  rngs = nnx.Rngs(params=cfg.seed)
  if cfg.kind == "dcnv2":
    return DCNv2Ranker(schema, cfg.dcnv2, row_multiple=row_multiple, rngs=rngs)
  if cfg.kind == "logreg":
    return LogisticRegression(schema, cfg.logreg, row_multiple=row_multiple, rngs=rngs)
  raise ValueError(f"unknown model kind {cfg.kind!r}; choose dcnv2 or logreg")
