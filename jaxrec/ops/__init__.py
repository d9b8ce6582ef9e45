"""Functional ops over kernels: FP8 scaling recipes, fp8_dense (custom_vjp; impl="xla" or
impl="pallas", the latter with interpret=True to run the kernels on CPU through the interpreter),
planned_dense (each of a dense site's three GEMMs in the numerics its SitePrecision chose),
delayed_dense (per-tensor FP8 with scales from amax histories), and the inference path with
weights quantized once (quantize_weight_nk, fp8_gemm_nt_prequantized)."""

from jaxrec.ops.delayed_dense import AMAX_HISTORY, delayed_dense, init_history
from jaxrec.ops.fp8_dense import IMPLS, dense_reference, fp8_dense, fp8_gemm_nt_prequantized, quantize_weight_nk
from jaxrec.ops.fp8_scaling import E4M3, E5M2, RECIPES, quantize_lhs, quantize_rhs, scaled_matmul
from jaxrec.ops.planned_dense import fuses, planned_dense

__all__ = ["AMAX_HISTORY", "delayed_dense", "init_history", "IMPLS", "dense_reference", "fp8_dense",
           "fp8_gemm_nt_prequantized", "quantize_weight_nk", "E4M3", "E5M2", "RECIPES", "quantize_lhs", "quantize_rhs",
           "scaled_matmul", "fuses", "planned_dense"]
