"""A device-resident hash table for embeddings: open addressing in JAX arrays, jit-compiled.

Keys are 64-bit ids held as two uint32 halves (jax runs without x64), values are [C, D] rows
with a write time, a model version and a write count per slot. Lookup and insert take batches.

    table = HashTable.create(capacity=1024, dim=16)
    table, stats = insert(table, keys_hi, keys_lo, values, now=t, version=v)
    found, rows, age = lookup(table, keys_hi, keys_lo, now=t, ttl=60)

Probing is linear over at most `max_probes` slots from the key's hash. An insert writes, in
order: the key's own slot if present, else the first free slot in its window, else it evicts
the window's oldest write (an LRU-by-write policy). Inserts are applied one after another
(`lax.scan`), so duplicates within a batch end with the last value, as a dict would. An entry
older than `ttl` seconds is reported as a miss (its slot stays until reused). A hit returns the
value last written for that exact key: a key never reads another key's row.

Two options serve callers that keep history per key (ERCache's stabilization ring): `valid`
masks rows out of an insert (padding of a fixed-shape batch writes nothing), and `ring=m` treats
each D-wide row as m sub-rows of D/m, appending the written [D/m] value at position
`(writes - 1) % m` instead of replacing the row; `ring_mean` averages the filled sub-rows. With
`restart_age`, an entry of the same key older than that is restarted (writes = 1, ring cleared)
rather than extended, so an expired history never leaks into a new one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

EMPTY = -(2**31)  # write_time of a free slot: int32 min, so that any time a clock gives (-1 too) is a write


@struct.dataclass
class HashTable:
  key_hi: jax.Array  # u32 [C]
  key_lo: jax.Array  # u32 [C]
  values: jax.Array  # [C, D]
  write_time: jax.Array  # i32 [C], EMPTY (int32 min) when free; times written must be > EMPTY
  version: jax.Array  # i32 [C]
  writes: jax.Array  # i32 [C], writes of the slot's key since it was (re)started there
  max_probes: int = struct.field(pytree_node=False, default=8)

  @classmethod
  def create(cls, capacity: int, dim: int, *, dtype=jnp.float32, max_probes: int = 8) -> "HashTable":
    if capacity < 1 or dim < 1:
      raise ValueError(f"capacity and dim must be >= 1, got {capacity} and {dim}")
    if not 1 <= max_probes <= capacity:
      raise ValueError(f"max_probes must be in [1, capacity], got {max_probes}")

    def zeros(dt):  # a fresh buffer per field, so that a jit may donate the whole table
      return jnp.zeros((capacity,), dt)

    return cls(zeros(jnp.uint32), zeros(jnp.uint32), jnp.zeros((capacity, dim), dtype),
               jnp.full((capacity,), EMPTY, jnp.int32), zeros(jnp.int32), zeros(jnp.int32), max_probes)

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


def probe(t: HashTable, hi: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(slot i32 [B], present bool [B]) of keys (hi, lo) [B], whatever their age. Where a key is
  absent its slot is an arbitrary in-range index: mask every gather with `present`. Traceable."""

  def one(h, l):
    slots, _, match = _window(t, h, l)
    return slots[jnp.argmax(match)], jnp.any(match)

  return jax.vmap(one)(hi, lo)


@jax.jit
def lookup(t: HashTable, hi: jax.Array, lo: jax.Array, now: jax.Array, ttl: jax.Array):
  """(found bool [B], rows [B, D], age i32 [B]) for keys (hi, lo) [B]; entries older than ttl miss."""
  slot, present = probe(t, hi, lo)
  age = now - t.write_time[slot]
  found = present & (age <= ttl)
  rows = jnp.where(found[:, None], t.values[slot], jnp.zeros_like(t.values[slot]))
  return found, rows, jnp.where(found, age, -1)


def ring_mean(rows: jax.Array, writes: jax.Array, ring: int) -> jax.Array:
  """f32 [B, D/ring]: mean of the filled sub-rows of ring rows [B, D] with write counts [B]
  (the last min(writes, ring) values written); zeros where writes == 0."""
  b, d = rows.shape
  sub = rows.reshape(b, ring, d // ring).astype(jnp.float32)
  n = jnp.minimum(writes, ring)
  filled = jnp.arange(ring)[None, :] < n[:, None]
  total = jnp.sum(jnp.where(filled[:, :, None], sub, 0.0), axis=1)
  return total / jnp.maximum(n, 1).astype(jnp.float32)[:, None]


@functools.partial(jax.jit, static_argnames=("ring",))
def insert(t: HashTable, hi: jax.Array, lo: jax.Array, values: jax.Array, now: jax.Array,
           version: jax.Array, valid: jax.Array | None = None, *, ring: int = 1,
           restart_age: jax.Array | None = None) -> tuple[HashTable, dict]:
  """Writes values [B, D/ring] for keys [B] at time `now` (rows where `valid` [B] is False are
  skipped); returns the table and counts of {"updated", "inserted", "evicted"}. A present key
  older than `restart_age` seconds counts as updated but starts afresh (see the module doc)."""
  d = t.values.shape[1]
  if ring < 1 or d % ring or values.shape[1] * ring != d:
    raise ValueError(f"ring={ring} needs values of width {d}/{ring}, got {values.shape}")
  if valid is None:
    valid = jnp.ones(hi.shape, bool)
  no_restart = jnp.iinfo(jnp.int32).max
  restart_age = jnp.asarray(no_restart if restart_age is None else restart_age, jnp.int32)

  def step(t: HashTable, x):
    h, l, v, ok = x
    slots, used, match = _window(t, h, l)
    free = ~used
    win_time = t.write_time[slots]  # read the window once, before any update (keeps updates in place)
    oldest = jnp.argmin(jnp.where(used, win_time, jnp.iinfo(jnp.int32).max))
    pick = jnp.where(jnp.any(match), jnp.argmax(match), jnp.where(jnp.any(free), jnp.argmax(free), oldest))
    slot = slots[pick]
    kind = jnp.where(jnp.any(match), 0, jnp.where(jnp.any(free), 1, 2))
    extend = (kind == 0) & (now - win_time[pick] <= restart_age)
    writes = jnp.where(extend, t.writes[slots][pick] + 1, 1)
    old = jnp.where(extend, t.values[slot], jnp.zeros_like(t.values[slot])).reshape(ring, d // ring)
    row = old.at[(writes - 1) % ring].set(v.astype(t.values.dtype)).reshape(d)
    target = jnp.where(ok, slot, t.capacity)  # out of range: a masked row writes nothing

    def put(a, new):
      return a.at[target].set(new, mode="drop")

    t = t.replace(key_hi=put(t.key_hi, h), key_lo=put(t.key_lo, l), values=put(t.values, row),
                  write_time=put(t.write_time, now), version=put(t.version, version),
                  writes=put(t.writes, writes))
    return t, jnp.where(ok, kind, 3)

  t, kinds = jax.lax.scan(step, t, (hi, lo, values, valid))
  return t, {"updated": jnp.sum(kinds == 0), "inserted": jnp.sum(kinds == 1), "evicted": jnp.sum(kinds == 2)}
