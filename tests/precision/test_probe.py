"""ProbeState: streaming statistics per GEMM site equal the batch statistics; save/load round trip."""

import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.precision.probe import ProbeConfig, ProbeState, spread_rows

SITES = [("a", 6, 4), ("b", 4, 3)]


def batches(seed, n=5):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(6, 6))
  for _ in range(n):
    x = rng.normal(size=(40, 6)) @ mix + 3.0
    yield {"a": jnp.asarray(x, jnp.float32), "b": jnp.asarray(rng.normal(size=(40, 4)), jnp.float32)}


def grads(seed):
  """Output gradients {site: dy [40, N]}: heavy-tailed rows, like a loss's (p - y) per example."""
  rng = np.random.default_rng(100 + seed)
  row = rng.standard_t(3, size=(40, 1))
  return {"a": jnp.asarray(row * rng.normal(size=(40, 4)) + 0.5, jnp.float32),
          "b": jnp.asarray(row * rng.normal(size=(40, 3)), jnp.float32)}


def weights(seed):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}


def test_streaming_activation_stats_equal_batch_stats():
  st = ProbeState.init(SITES)
  update = jax.jit(lambda s, a, w, g: s.update(a, w, max_rows=32, grads=g))
  seen, seen_dy = [], []
  for i, acts in enumerate(batches(0)):
    dys = grads(i)
    st = update(st, acts, weights(i), dys)
    spread = (np.arange(32) * 40) // 32  # 32 of the 40 rows, evenly spaced (spread_rows)
    seen.append(np.asarray(acts["a"])[spread])
    seen_dy.append(np.asarray(dys["a"])[spread])
  x, dy = np.concatenate(seen), np.concatenate(seen_dy)
  np.testing.assert_allclose(st.acts["a"].mean, x.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(st.acts["a"].covariance(), np.cov(x.T), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(st.grads["a"].mean, dy.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(st.grads["a"].covariance(), np.cov(dy.T), rtol=1e-4, atol=1e-4)
  assert int(st.updates) == 5 and float(st.acts["a"].count) == 160.0 == float(st.grads["b"].count)


def test_rows_are_spread_over_the_batch_not_its_first():
  """A training batch's rows come sorted (in time on the ads world): the statistics took its first
  max_rows, about its earliest quarter; they take rows spread over all of it."""
  x = jnp.arange(16.0)[:, None] * jnp.ones((1, 6))  # row i holds i
  st = ProbeState.init(SITES).update({"a": x, "b": jnp.ones((16, 4))}, weights(0), max_rows=4,
                                     grads={"a": jnp.ones((16, 4)), "b": jnp.ones((16, 3))})
  np.testing.assert_allclose(st.acts["a"].mean, np.full(6, (0 + 4 + 8 + 12) / 4))
  np.testing.assert_array_equal(spread_rows(x, 100), x)  # fewer rows than max_rows: all of them


def test_weight_ema_starts_at_the_weight_and_tracks_it():
  st = ProbeState.init(SITES, weight_decay=0.5)
  w0 = weights(0)
  st = st.update(next(batches(0)), w0, max_rows=8, grads=grads(0))
  np.testing.assert_allclose(st.weights["a"].mean, w0["a"])  # first update: the weight itself
  w1 = weights(1)
  st = st.update(next(batches(1)), w1, max_rows=8, grads=grads(1))
  np.testing.assert_allclose(st.weights["a"].mean, 0.5 * w0["a"] + 0.5 * w1["a"], rtol=1e-6)
  assert np.isfinite(np.asarray(st.weights["a"].u)).all() and float(jnp.trace(st.weights["a"].u)) == pytest.approx(6.0, rel=1e-4)


def test_missing_site_is_clear():
  st = ProbeState.init(SITES)
  acts = next(batches(0))
  del acts["b"]
  with pytest.raises(ValueError, match=r"lacks GEMM sites \['b'\]"):
    st.update(acts, weights(0), max_rows=8, grads=grads(0))
  with pytest.raises(ValueError, match=r"lacks GEMM sites \['a', 'b'\]"):  # dy is tracked: grads are required
    st.update(next(batches(0)), weights(0), max_rows=8)


def test_save_load_round_trip(tmp_path):
  st = ProbeState.init(SITES)
  for i, acts in enumerate(batches(3, 2)):
    st = st.update(acts, weights(i), max_rows=16, grads=grads(i))
  st.save(tmp_path / "p.npz")
  back = ProbeState.load(tmp_path / "p.npz")
  assert set(back.grads) == {"a", "b"}
  for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_statistics_saved_without_output_gradients_still_load(tmp_path):
  """probe_stats.npz written before dy was probed: loads with no dy (the error model then uses N(0, 1))."""
  st = ProbeState.init(SITES).update(next(batches(0)), weights(0), max_rows=16, grads=grads(0))
  st.save(tmp_path / "p.npz")
  z = dict(np.load(tmp_path / "p.npz"))
  np.savez(tmp_path / "old.npz", **{k: v for k, v in z.items() if not k.startswith("dy/")})
  old = ProbeState.load(tmp_path / "old.npz")
  assert old.grads == {} and set(old.acts) == {"a", "b"}
  np.testing.assert_array_equal(old.acts["a"].m2, st.acts["a"].m2)


def test_config_checks():
  with pytest.raises(ValueError):
    ProbeConfig(every=-1)
  with pytest.raises(ValueError):
    ProbeConfig(weight_decay=1.0)


def test_after_one_update_the_learned_weights_are_the_weight():
  """One Probe update has seen no weight movement: the matrix-normal has no spread (V = 0), its
  samples are the weight itself, and the error model still scores the site (a run probed once)."""
  from jaxrec.precision.error_model import Gaussian, MatrixNormal, mere_for_site, sample_matrix_normal
  st = ProbeState.init(SITES).update(next(batches(0)), weights(0), max_rows=8, grads=grads(0))
  mn = MatrixNormal.from_ema(st.weights["a"])
  assert float(jnp.abs(mn.v).max()) == 0.0
  samples = sample_matrix_normal(jax.random.key(0), mn, 3)
  np.testing.assert_array_equal(np.asarray(samples), np.broadcast_to(np.asarray(weights(0)["a"]), (3, 6, 4)))
  est = mere_for_site(jax.random.key(1), Gaussian.from_welford(st.acts["a"]), mn, Gaussian.from_welford(st.grads["a"]),
                      candidates=["bf16", "fp8_tensor"], num_samples=4, batch=16)
  assert all(0 < e.mean < 0.2 for c in est.values() for e in c.values())


def test_truncated_or_incomplete_statistics_are_a_clear_error(tmp_path):
  """A probe_stats.npz cut short (a run killed while saving it, a partial copy) or missing arrays
  raised zipfile.BadZipFile / KeyError (stack traces past train.probe's error handling)."""
  st = ProbeState.init(SITES).update(next(batches(0)), weights(0), max_rows=16, grads=grads(0))
  st.save(tmp_path / "p.npz")
  data = (tmp_path / "p.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
  z = dict(np.load(tmp_path / "p.npz"))
  np.savez(tmp_path / "part.npz", **{k: v for k, v in z.items() if k != "w/a/u"})
  np.save(tmp_path / "array.npy", np.ones(3))
  with zipfile.ZipFile(tmp_path / "p.npz") as src, zipfile.ZipFile(tmp_path / "empty.npz", "w") as dst:
    for name in src.namelist():  # one array written only in part (np.savez killed mid-write)
      dst.writestr(name, b"" if name == "act/a/m2.npy" else src.read(name))
  for name in ("cut.npz", "part.npz", "array.npy", "empty.npz", "none.npz"):
    with pytest.raises(ValueError, match="not a probe_stats.npz"):
      ProbeState.load(tmp_path / name)


def test_a_save_interrupted_midway_keeps_the_previous_statistics(tmp_path, monkeypatch):
  """The training loop saves probe_stats.npz at every checkpoint; np.savez wrote over the file in
  place, so a run killed (Ctrl-C) while saving lost the statistics and could not resume them."""
  st = ProbeState.init(SITES).update(next(batches(0)), weights(0), max_rows=16, grads=grads(0))
  st.save(tmp_path / "p.npz")
  later = st.update(next(batches(1)), weights(1), max_rows=16, grads=grads(1))
  write_array, calls = np.lib.format.write_array, []

  def killed(*a, **k):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return write_array(*a, **k)

  monkeypatch.setattr(np.lib.format, "write_array", killed)
  with pytest.raises(KeyboardInterrupt):
    later.save(tmp_path / "p.npz")
  monkeypatch.undo()
  back = ProbeState.load(tmp_path / "p.npz")
  assert int(back.updates) == 1
  np.testing.assert_array_equal(np.asarray(back.acts["a"].m2), np.asarray(st.acts["a"].m2))
