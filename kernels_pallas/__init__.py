"""Pallas GPU kernels (Mosaic GPU for sm90), arrays in and arrays out.

Each kernel sits in its own file with a plain-jnp `*_reference`, a frozen TuningConfig and an
`interpret` flag that runs it on CPU through jax's Mosaic GPU interpreter (../shared/STYLE.md):
    fp8_gemm_sm90   FP8 GEMM, row/column scales, fused bias + activation (first, plain version)
"""
