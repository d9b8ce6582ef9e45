"""Models built from jaxrec.layers."""

from jaxrec.models.dcnv2 import DCNv2Config, DCNv2Ranker
from jaxrec.models.logreg import LogisticRegression, LogRegConfig

__all__ = ["DCNv2Config", "DCNv2Ranker", "LogisticRegression", "LogRegConfig"]
from jaxrec.models.factory import ModelConfig, build_model, is_plan_file, parse_precision_plan

__all__ += ["ModelConfig", "build_model", "is_plan_file", "parse_precision_plan"]
