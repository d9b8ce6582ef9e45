"""LoKA precision: Probe statistics (streaming Gaussian and matrix-normal estimates), the error
model (MERE of candidate GEMM numerics on operands sampled from those statistics), the precision
plan, and Dispatch (per-GEMM kernel choice under a MERE bound, with autotuned timings)."""

from jaxrec.precision.dispatch import (DEFAULT_BOUND, DEFAULT_REGISTRY, MIN_SPEEDUP, Aggregate, DispatchCandidate,
                                       GemmShape, Registry, ReportRow, Timings, TimingCache, aggregate, autotune,
                                       choose_gemm, make_plan, site_shapes)
from jaxrec.precision.error_model import (CANDIDATES, GEMMS, Candidate, Gaussian, MatrixNormal, MereEstimate,
                                          check_real_quantization, get_candidates, mere, mere_for_site,
                                          mere_on_operands, reference_matmul, sample_gaussian,
                                          sample_matrix_normal)
from jaxrec.precision.plan import GemmChoice, PlanError, PlanFileError, PrecisionPlan, SitePrecision
from jaxrec.precision.stats import MatrixNormalEMA, Welford, flip_flop

__all__ = ["CANDIDATES", "DEFAULT_BOUND", "DEFAULT_REGISTRY", "GEMMS", "MIN_SPEEDUP", "Aggregate", "Candidate",
           "DispatchCandidate", "Gaussian", "GemmChoice", "GemmShape", "MatrixNormal", "MatrixNormalEMA",
           "MereEstimate", "PlanError", "PlanFileError", "PrecisionPlan", "Registry", "ReportRow", "SitePrecision", "Timings", "TimingCache",
           "Welford", "aggregate", "autotune", "check_real_quantization", "choose_gemm", "flip_flop",
           "get_candidates", "make_plan", "mere", "mere_for_site", "mere_on_operands", "reference_matmul",
           "sample_gaussian", "sample_matrix_normal", "site_shapes"]
