"""LoKA precision: Probe statistics (streaming Gaussian and matrix-normal estimates) so far."""

from jaxrec.precision.stats import MatrixNormalEMA, Welford, flip_flop

__all__ = ["MatrixNormalEMA", "Welford", "flip_flop"]
