"""Row-wise Adagrad applied sparsely to an embedding table (the TorchRec/FBGEMM recipe).

Row-wise Adagrad keeps one accumulator per table row: for each row r with summed gradient g_r
[D] in this step,

    acc_r <- acc_r + mean(g_r ** 2)
    W_r   <- W_r - lr * g_r / (sqrt(acc_r) + eps)

Rows not looked up in the step have g_r = 0 and are left untouched, so the update only needs the
rows that were looked up. `sparse_rowwise_adagrad` takes the gradient with respect to the gathered
rows (one [D] vector per lookup), sums duplicates, and scatters the update: it never
materialises a dense [R, D] gradient, which on a 5M-row table is most of the step's memory
traffic. `dense_rowwise_adagrad` is the same rule on a dense gradient, kept as the reference the
sparse path is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sparse_rowwise_adagrad(table: jax.Array, acc: jax.Array, row_ids: jax.Array, row_grads: jax.Array,
                           mask: jax.Array, *, lr: float, eps: float = 1e-8) -> tuple[jax.Array, jax.Array]:
  """One sparse row-wise Adagrad step.

  table f32 [R, D], acc f32 [R], row_ids i32 [...] (rows that were looked up), row_grads [..., D]
  (d loss / d gathered row), mask bool [...] (False = padding lookup, ignored).
  Returns the new (table, acc).
  """
  table, acc = jnp.asarray(table), jnp.asarray(acc)
  r, d = table.shape
  ids = jnp.asarray(row_ids).reshape(-1)
  g = jnp.asarray(row_grads).reshape(-1, d).astype(jnp.float32)
  valid = jnp.asarray(mask).reshape(-1)
  n = ids.shape[0]
  ids = jnp.where(valid, ids, r)  # padding goes to an out-of-range row, dropped below
  uniq, inverse = jnp.unique(ids, size=n, fill_value=r, return_inverse=True)
  g_sum = jax.ops.segment_sum(jnp.where(valid[:, None], g, 0.0), inverse.reshape(-1), num_segments=n)
  acc_rows = acc.at[uniq].get(mode="fill", fill_value=0.0) + jnp.mean(g_sum * g_sum, axis=-1)
  step = lr * g_sum / (jnp.sqrt(acc_rows)[:, None] + eps)
  new_acc = acc.at[uniq].set(acc_rows, mode="drop", unique_indices=True)
  new_table = table.at[uniq].add(-step.astype(table.dtype), mode="drop", unique_indices=True)
  return new_table, new_acc


def dense_rowwise_adagrad(table: jax.Array, acc: jax.Array, grad: jax.Array, *, lr: float,
                          eps: float = 1e-8) -> tuple[jax.Array, jax.Array]:
  """Reference: the same rule on a dense gradient [R, D]; rows with zero gradient are unchanged."""
  touched = jnp.any(grad != 0, axis=-1)
  new_acc = acc + jnp.mean(grad * grad, axis=-1)
  step = lr * grad / (jnp.sqrt(new_acc)[:, None] + eps)
  return jnp.where(touched[:, None], table - step, table), jnp.where(touched, new_acc, acc)
