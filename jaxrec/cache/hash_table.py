"""A device-resident hash table for embeddings: open addressing in JAX arrays, jit-compiled.

Keys are 64-bit ids held as two uint32 halves (jax runs without x64), values are [C, D] rows
with a write time and a model version per slot. Lookup and insert take batches.

    table = HashTable.create(capacity=1024, dim=16)
    table, stats = insert(table, keys_hi, keys_lo, values, now=t, version=v)
    found, rows, age = lookup(table, keys_hi, keys_lo, now=t, ttl=60)

Probing is linear over at most `max_probes` slots from the key's hash. An insert writes, in
order: the key's own slot if present, else the first free slot in its window, else it evicts
the window's oldest write (an LRU-by-write policy). Inserts are applied one after another
(`lax.scan`), so duplicates within a batch end with the last value, as a dict would. An entry
older than `ttl` seconds is reported as a miss (its slot stays until reused). A hit returns the
value last written for that exact key: a key never reads another key's row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

EMPTY = -1  # write_time of a free slot


@struct.dataclass
class HashTable:
  key_hi: jax.Array  # u32 [C]
  key_lo: jax.Array  # u32 [C]
  values: jax.Array  # [C, D]
  write_time: jax.Array  # i32 [C], EMPTY when free
  version: jax.Array  # i32 [C]
  max_probes: int = struct.field(pytree_node=False, default=8)

  @classmethod
  def create(cls, capacity: int, dim: int, *, dtype=jnp.float32, max_probes: int = 8) -> "HashTable":
    if capacity < 1 or dim < 1:
      raise ValueError(f"capacity and dim must be >= 1, got {capacity} and {dim}")
    if not 1 <= max_probes <= capacity:
      raise ValueError(f"max_probes must be in [1, capacity], got {max_probes}")
    z = jnp.zeros((capacity,), jnp.uint32)
    return cls(z, z, jnp.zeros((capacity, dim), dtype), jnp.full((capacity,), EMPTY, jnp.int32),
               jnp.zeros((capacity,), jnp.int32), max_probes)

  @property
  def capacity(self) -> int:
    return self.write_time.shape[0]


def split_keys(keys) -> tuple[jax.Array, jax.Array]:
  """Python/numpy int64 keys -> (hi, lo) uint32 halves."""
  import numpy as np
  k = np.asarray(keys, dtype=np.int64).view(np.uint64)
  return jnp.asarray((k >> 32).astype(np.uint32)), jnp.asarray((k & 0xFFFFFFFF).astype(np.uint32))


def _home(hi: jax.Array, lo: jax.Array, capacity: int) -> jax.Array:
  x = lo ^ (hi * jnp.uint32(0x85EBCA6B))
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  return (x % jnp.uint32(capacity)).astype(jnp.int32)


def _window(t: HashTable, hi, lo):
  slots = (_home(hi, lo, t.capacity) + jnp.arange(t.max_probes)) % t.capacity
  used = t.write_time[slots] != EMPTY
  match = used & (t.key_hi[slots] == hi) & (t.key_lo[slots] == lo)
  return slots, used, match


@jax.jit
def lookup(t: HashTable, hi: jax.Array, lo: jax.Array, now: jax.Array, ttl: jax.Array):
  """(found bool [B], rows [B, D], age i32 [B]) for keys (hi, lo) [B]; entries older than ttl miss."""

  def one(h, l):
    slots, _, match = _window(t, h, l)
    any_match = jnp.any(match)
    slot = slots[jnp.argmax(match)]
    age = now - t.write_time[slot]
    found = any_match & (age <= ttl)
    return found, jnp.where(found, t.values[slot], jnp.zeros_like(t.values[slot])), jnp.where(found, age, -1)

  return jax.vmap(one)(hi, lo)


@jax.jit
def insert(t: HashTable, hi: jax.Array, lo: jax.Array, values: jax.Array, now: jax.Array,
           version: jax.Array) -> tuple[HashTable, dict]:
  """Writes rows [B, D] for keys [B] at time `now`; returns the table and counts of
  {"updated", "inserted", "evicted"}."""

  def step(t: HashTable, x):
    h, l, v = x
    slots, used, match = _window(t, h, l)
    free = ~used
    oldest = jnp.argmin(jnp.where(used, t.write_time[slots], jnp.iinfo(jnp.int32).max))
    pick = jnp.where(jnp.any(match), jnp.argmax(match), jnp.where(jnp.any(free), jnp.argmax(free), oldest))
    slot = slots[pick]
    kind = jnp.where(jnp.any(match), 0, jnp.where(jnp.any(free), 1, 2))
    t = t.replace(key_hi=t.key_hi.at[slot].set(h), key_lo=t.key_lo.at[slot].set(l),
                  values=t.values.at[slot].set(v.astype(t.values.dtype)),
                  write_time=t.write_time.at[slot].set(now), version=t.version.at[slot].set(version))
    return t, kind

  t, kinds = jax.lax.scan(step, t, (hi, lo, values))
  return t, {"updated": jnp.sum(kinds == 0), "inserted": jnp.sum(kinds == 1), "evicted": jnp.sum(kinds == 2)}
