"""Functional ops over kernels: FP8 scaling recipes, fp8_dense (custom_vjp; impl="xla" or
impl="pallas", the latter with interpret=True to run the kernels on CPU through the interpreter),
and planned_dense (each of a dense site's three GEMMs in the numerics its SitePrecision chose)."""

from jaxrec.ops.fp8_dense import IMPLS, dense_reference, fp8_dense
from jaxrec.ops.fp8_scaling import E4M3, E5M2, RECIPES, quantize_lhs, quantize_rhs, scaled_matmul
from jaxrec.ops.planned_dense import fuses, planned_dense

__all__ = ["IMPLS", "dense_reference", "fp8_dense", "E4M3", "E5M2", "RECIPES", "quantize_lhs", "quantize_rhs",
           "scaled_matmul", "fuses", "planned_dense"]
