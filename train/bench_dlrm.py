"""Training throughput of jaxrec's DCNv2 ranker on the MLPerf-DLRMv2-like config.

    python -m train.bench_dlrm                 # full config (meant for a GPU): batch 65536
    python -m train.bench_dlrm --small         # CPU smoke: batch 1024, 1000 rows per table
    python -m train.bench_dlrm --dtype float32 --steps 20

Config (the anchor's, ../shared/bench/dlrm_anchor.py): 13 dense and 26 one-hot sparse features,
26 tables of 200k rows x 128 fused into one table, bottom MLP 13-512-256-128, 3 DCNv2 cross
layers of rank 512 over 27*128, top MLP 1024-1024-512-256-1, batch 65536, bf16 compute with f32
parameters; jaxrec trains embeddings with sparse row-wise Adagrad and dense layers with Adam (the
anchor uses plain SGD everywhere, which is cheaper per step). Batches are random and already on
the device, as in the anchor, so this measures the training step, not the input pipeline.
Prints examples/s (median of several timed loops after warm-up) and model TF/s on stdout; progress
(setup, compile and warm-up, the timed loops) goes to stderr.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxrec.data.batch import Batch, Schema, SparseFeature
from jaxrec.interrupts import entrypoint
from jaxrec.models import DCNv2Config, ModelConfig, build_model
from jaxrec.progress import progress
from jaxrec.training import sharding
from jaxrec.training.state import create_train_state
from jaxrec.training.step import OptimConfig, batch_shardings, dense_optimizer, make_train_step

NUM_DENSE, NUM_SPARSE, DIM = 13, 26, 128
WARMUP_STEPS = 3  # the first compiles the step


def flops_per_example(x_dim: int = (NUM_SPARSE + 1) * DIM) -> float:
  """Model GEMM flops per example, forward + backward (the anchor's formula)."""
  macs = sum(a * b for a, b in [(13, 512), (512, 256), (256, 128)])
  macs += 3 * (x_dim * 512 + 512 * x_dim)
  macs += sum(a * b for a, b in [(x_dim, 1024), (1024, 1024), (1024, 512), (512, 256), (256, 1)])
  return 2.0 * macs * 3


def random_batch(key: jax.Array, batch: int, rows: int) -> Batch:
  k1, k2, k3 = jax.random.split(key, 3)
  return Batch(
      dense=jax.random.normal(k1, (batch, NUM_DENSE), jnp.float32),
      sparse=jax.random.randint(k2, (batch, NUM_SPARSE, 1), 0, rows, jnp.int32),
      sparse_mask=jnp.ones((batch, NUM_SPARSE, 1), bool),
      labels=jax.random.bernoulli(k3, 0.5, (batch, 1)).astype(jnp.float32),
      weights=jnp.ones((batch,), jnp.float32),
      domain=jnp.zeros((batch,), jnp.int32),
      timestamp=jnp.zeros((batch,), jnp.int32),
  )


def note(msg: str) -> None:
  """A progress line on stderr (stdout carries only the results)."""
  print(f"bench_dlrm: {msg}", file=sys.stderr, flush=True)


@entrypoint
def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.bench_dlrm", description=__doc__.split("\n\n")[0])
  p.add_argument("--small", action="store_true", help="CPU smoke size: batch 1024, 1000 rows per table")
  p.add_argument("--batch", type=int, default=None, help="global batch size (default 65536, small 1024)")
  p.add_argument("--rows", type=int, default=None, help="rows per table (default 200000, small 1000)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                 help="compute dtype (default bfloat16)")
  p.add_argument("--steps", type=int, default=None, help="steps per timed loop (default 30, small 3)")
  p.add_argument("--repeats", type=int, default=3, help="timed loops; the median is reported (default 3)")
  a = p.parse_args(argv)
  for name in ("batch", "rows", "steps", "repeats"):
    if getattr(a, name) is not None and getattr(a, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
  batch = a.batch if a.batch is not None else (1024 if a.small else 65536)
  rows = a.rows if a.rows is not None else (1000 if a.small else 200_000)
  steps = a.steps if a.steps is not None else (3 if a.small else 30)

  schema = Schema(dense=tuple(f"I{i}" for i in range(NUM_DENSE)),
                  sparse=tuple(SparseFeature(f"C{i}", rows) for i in range(NUM_SPARSE)), labels=("click",))
  model_cfg = ModelConfig(dcnv2=DCNv2Config(embed_dim=DIM, bottom_mlp=(512, 256), num_cross=3, cross_rank=512,
                                            top_mlp=(1024, 1024, 512, 256), compute_dtype=a.dtype,
                                            max_rows_per_feature=rows))
  try:  # a usage error before anything is built or compiled, not a traceback
    mesh = sharding.make_mesh()
    sharding.check_batch_size(batch, mesh, "--batch")
  except ValueError as e:
    p.error(str(e))
  note(f"building the model and {batch}-example batches on {mesh.devices.size} device(s) ...")
  optim = OptimConfig(dense_lr=1e-4, embedding_lr=0.01)
  tx = dense_optimizer(optim)
  graphdef, state, state_sh = create_train_state(
      lambda: build_model(schema, model_cfg, row_multiple=mesh.devices.size), tx, mesh)
  bsh = batch_shardings(mesh, with_truth=False)
  step = make_train_step(graphdef, tx, optim, state_sh, bsh)
  batches = [jax.device_put(random_batch(k, batch, rows), bsh) for k in jax.random.split(jax.random.key(0), 3)]

  note(f"compiling the train step and warming up ({WARMUP_STEPS} steps) ...")
  t0 = time.perf_counter()
  for i in range(WARMUP_STEPS):
    state, m = step(state, batches[i % 3])
  jax.block_until_ready(state)
  warm = time.perf_counter() - t0
  note(f"compiled and warmed up in {warm:.1f}s; timing {a.repeats} loop(s) of {steps} steps")
  times = []
  # the bar moves once per loop, after its steps finished: a sync per step would change what is timed
  with progress(a.repeats * steps, "timed steps") as bar:
    for _ in range(a.repeats):
      t0 = time.perf_counter()
      for i in range(steps):
        state, m = step(state, batches[i % 3])
      jax.block_until_ready(state)
      times.append((time.perf_counter() - t0) / steps)
      bar.update(steps, step_ms=times[-1] * 1e3)
  t = statistics.median(times)
  loss = float(m["loss"])
  print(f"device={jax.devices()[0].device_kind} x{mesh.devices.size} batch={batch} rows/table={rows} "
        f"dtype={a.dtype} table={state.table.shape}")
  print(f"jaxrec dcnv2 (rowwise-adagrad emb + adam dense)  {batch / t:>12,.0f} ex/s  "
        f"{flops_per_example() * batch / t / 1e12:6.1f} TF/s  step {t * 1e3:.2f} ms  loss {loss:.4f}  warm {warm:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
