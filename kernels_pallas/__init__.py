"""Pallas GPU kernels (Mosaic GPU for sm90), arrays in and arrays out.

Empty until the FP8 GEMM issue lands: each kernel will sit in its own file with a plain-jnp
`*_reference`, a frozen TuningConfig and an interpret flag for CPU (see ../shared/STYLE.md).
"""
