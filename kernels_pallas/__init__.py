"""Pallas GPU kernels (Mosaic GPU for sm90), arrays in and arrays out.

Each kernel sits in its own file with a plain-jnp `*_reference`, a frozen TuningConfig and an
`interpret` flag that runs it on CPU through jax's Mosaic GPU interpreter (../shared/STYLE.md):
    fp8_gemm_sm90      FP8 GEMM (weight stored (N, K)): row-wise `fp8_gemm` and block-wise
                       `fp8_gemm_blockwise` scales; fused bias, BlockNorm and ReLU/HardSwish epilogue;
                       any M, N, K (zero-padded). Plain pipeline, no warp specialisation yet.
    fp8_quantize_sm90  bf16/f32 -> fp8 with row-wise or 1x128 block-wise amax scales in one pass
Benchmarks: `python -m kernels_pallas.bench` (GEMMs and the fused layer against XLA bf16 and
XLA fp8), `python -m kernels_pallas.bench_quantize` (quantize against jitted jnp).
None of them has been compiled or timed on an H100 yet (docs/BENCHMARKS.md).
"""
