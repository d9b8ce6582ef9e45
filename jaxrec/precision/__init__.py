"""LoKA precision: Probe statistics (streaming Gaussian and matrix-normal estimates) and the error
model (MERE of candidate GEMM numerics on operands sampled from those statistics)."""

from jaxrec.precision.error_model import (CANDIDATES, GEMMS, Candidate, Gaussian, MatrixNormal, MereEstimate,
                                          check_real_quantization, get_candidates, mere, mere_for_site,
                                          mere_on_operands, reference_matmul, sample_gaussian,
                                          sample_matrix_normal)
from jaxrec.precision.plan import GemmChoice, PrecisionPlan, SitePrecision
from jaxrec.precision.stats import MatrixNormalEMA, Welford, flip_flop

__all__ = ["CANDIDATES", "GEMMS", "Candidate", "GemmChoice", "PrecisionPlan", "SitePrecision", "Gaussian", "MatrixNormal", "MatrixNormalEMA", "MereEstimate",
           "Welford", "check_real_quantization", "flip_flop", "get_candidates", "mere", "mere_for_site",
           "mere_on_operands", "reference_matmul", "sample_gaussian", "sample_matrix_normal"]
