"""ModelConfig: which ranker to build, and `build_model` that builds it for a schema."""

from __future__ import annotations

import dataclasses
from typing import Literal

from flax import nnx

from jaxrec.data.batch import Schema
from jaxrec.models.dcnv2 import DCNv2Config, DCNv2Ranker
from jaxrec.models.logreg import LogisticRegression, LogRegConfig
from jaxrec.precision.plan import IMPLS, NUMERICS, PrecisionPlan


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  kind: Literal["dcnv2", "logreg"] = "dcnv2"
  """dcnv2 (embeddings + cross network + MLP) or logreg (the no-interaction baseline)"""
  seed: int = 0
  """seed of the parameter initialisation"""
  precision_plan: str = ""
  """numerics of each GEMM (dcnv2 only): empty = all in dcnv2.compute_dtype; uniform:NUMERICS or
  uniform:NUMERICS:IMPL = every GEMM of every layer so (NUMERICS f32, bf16, fp8_tensor, fp8_row,
  fp8_block, fp8_delayed; IMPL xla, the default, or pallas on a GPU), e.g. uniform:fp8_row; else the path of a
  plan JSON (train.probe's precision_plan.json, or a bare PrecisionPlan)"""
  dcnv2: DCNv2Config = DCNv2Config()
  logreg: LogRegConfig = LogRegConfig()

  def __post_init__(self):
    parse_precision_plan(self.precision_plan)  # a bad spec or plan file fails when the config is made
    if self.kind == "logreg" and self.precision_plan:
      raise ValueError("the logreg model has no GEMM sites; model.precision_plan applies to dcnv2 only")


def is_plan_file(spec: str) -> bool:
  """Whether a ModelConfig.precision_plan names a plan JSON file (not "" and not uniform:...)."""
  return bool(spec) and not spec.startswith("uniform:")


def parse_precision_plan(spec: str) -> PrecisionPlan | None:
  """ModelConfig.precision_plan -> the plan: None for "", PrecisionPlan.uniform for
  "uniform:NUMERICS[:IMPL]", else PrecisionPlan.load(spec) (a JSON file).

  >>> parse_precision_plan("uniform:fp8_row").site("top.layers.0").wgrad
  GemmChoice(numerics='fp8_row', impl='xla')
  """
  if is_plan_file(spec):
    return PrecisionPlan.load(spec)
  if spec.startswith("uniform:"):
    parts = spec.split(":")[1:]
    if len(parts) not in (1, 2) or parts[0] not in NUMERICS or (len(parts) == 2 and parts[1] not in IMPLS):
      raise ValueError(f"model.precision_plan {spec!r}: expected uniform:NUMERICS or uniform:NUMERICS:IMPL "
                       f"with NUMERICS in {NUMERICS} and IMPL in {IMPLS}")
    return PrecisionPlan.uniform(*parts)
  return None


def build_model(schema: Schema, cfg: ModelConfig, *, row_multiple: int = 1,
                plan: PrecisionPlan | None = None) -> DCNv2Ranker | LogisticRegression:
  """A freshly initialised model. Every model has `.embedding` (a FusedEmbedding), `.combiner`
  and `.from_pooled(dense, pooled) -> logits [B, T]`.

  plan: the dcnv2 GEMMs' precision plan; None = the one cfg.precision_plan names (if any). Giving
  both is a ValueError.
  """
  if plan is not None and cfg.precision_plan:
    raise ValueError(f"build_model got a plan and model.precision_plan={cfg.precision_plan!r}: give one")
  plan = plan if plan is not None else parse_precision_plan(cfg.precision_plan)
  rngs = nnx.Rngs(params=cfg.seed)
  if cfg.kind == "dcnv2":
    return DCNv2Ranker(schema, cfg.dcnv2, row_multiple=row_multiple, plan=plan, rngs=rngs)
  if cfg.kind == "logreg":
    if plan is not None:
      raise ValueError("the logreg model has no GEMM sites; a precision plan applies to dcnv2 only")
    return LogisticRegression(schema, cfg.logreg, row_multiple=row_multiple, rngs=rngs)
  raise ValueError(f"unknown model kind {cfg.kind!r}; choose dcnv2 or logreg")
