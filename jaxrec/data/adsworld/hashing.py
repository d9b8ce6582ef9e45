"""Counter-based randomness: uniforms and normals as pure functions of integer keys.

The world needs randomness that does not depend on how examples are batched (an example's label must
be the same whichever batch holds it) and stateless per-(user, slot, time bucket) draws (candidates
that persist across a user's requests). Both come from a splitmix64 hash of integer keys, vectorised
over numpy uint64 arrays (integer array arithmetic wraps modulo 2^64 without warnings).
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


def stable_id(name: str) -> int:
  """A 63-bit id of a string that is the same in every process (unlike `hash`)."""
  return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def _mix(x: np.ndarray) -> np.ndarray:
  x = (x ^ (x >> _S30)) * _M1
  x = (x ^ (x >> _S27)) * _M2
  return x ^ (x >> _S31)


def hash64(*keys) -> np.ndarray:
  """uint64 hash of the broadcast integer keys (non-negative ints or int arrays), shape broadcast.

  Order matters: hash64(a, b) != hash64(b, a). Always returns an array of ndim >= 1.
  """
  arrs = [np.atleast_1d(np.asarray(k)).astype(np.uint64) for k in keys]
  shape = np.broadcast_shapes(*(a.shape for a in arrs))
  h = np.full(shape, _GOLDEN, np.uint64)
  for a in arrs:
    h = _mix(h ^ _mix(a + _GOLDEN))
  return h


def substream(h: np.ndarray, i: int) -> np.ndarray:
  """The i-th derived hash of base hashes `h` (cheap: one mix)."""
  return _mix(h + np.uint64((0x9E3779B97F4A7C15 * (i + 1)) % (1 << 64)))


def to_uniform(h: np.ndarray) -> np.ndarray:
  """float64 uniforms in [0, 1) from uint64 hashes (53 random bits)."""
  return (h >> _S11).astype(np.float64) * (1.0 / 9007199254740992.0)


def to_normal(h: np.ndarray) -> np.ndarray:
  """Standard normals from uint64 hashes (Box-Muller on two derived uniforms)."""
  u1 = 1.0 - to_uniform(substream(h, 100))  # (0, 1]
  u2 = to_uniform(substream(h, 101))
  return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
