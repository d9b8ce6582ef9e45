"""A PrecisionPlan given to the ranker: GEMM site names, validation, config spelling, and training."""

import json

import jax
import numpy as np
import pytest

from jaxrec.config import parse_config
from jaxrec.layers import gemm_sites
from jaxrec.models import DCNv2Config, ModelConfig, build_model, parse_precision_plan
from jaxrec.precision.plan import GemmChoice, PlanError, PrecisionPlan, SitePrecision
from jaxrec.training import sharding
from jaxrec.training.state import create_train_state
from jaxrec.training.step import OptimConfig, batch_shardings, dense_optimizer, make_train_step
from tests.models.test_models import SCHEMA, _batch
from tests.training.test_step import SCHEMA as TRAIN_SCHEMA
from tests.training.test_step import make_batch

SMALL = DCNv2Config(embed_dim=4, bottom_mlp=(8,), num_cross=2, cross_rank=3, top_mlp=(16, 8))


def test_gemm_sites_are_the_module_paths():
  m = build_model(SCHEMA, ModelConfig(dcnv2=SMALL))
  x_dim = 3 * 4  # (2 sparse + bottom) x embed_dim
  assert gemm_sites(m) == [("bottom.layers.0", 2, 8), ("bottom.layers.1", 8, 4),
                           ("cross.layers.0.u", x_dim, 3), ("cross.layers.0.v", 3, x_dim),
                           ("cross.layers.1.u", x_dim, 3), ("cross.layers.1.v", 3, x_dim),
                           ("top.layers.0", x_dim, 16), ("top.layers.1", 16, 8)]


def test_plan_reaches_its_sites_and_foreign_sites_are_rejected():
  fp8 = SitePrecision(GemmChoice("fp8_row"), GemmChoice("bf16"), GemmChoice("fp8_block"))
  plan = PrecisionPlan(sites={"top.layers.1": fp8, "cross.layers.0.v": SitePrecision.uniform("f32")})
  m = build_model(SCHEMA, ModelConfig(dcnv2=SMALL), plan=plan)
  assert m.top.layers[1].precision == fp8
  assert m.cross.layers[0].v.precision == SitePrecision.uniform("f32")
  assert m.top.layers[0].precision == m.bottom.layers[0].precision == plan.default
  assert np.all(np.isfinite(np.asarray(m(_batch(SCHEMA)))))
  no_plan = build_model(SCHEMA, ModelConfig(dcnv2=SMALL))
  assert no_plan.top.layers[1].precision == SitePrecision.uniform("f32")  # compute_dtype's plain path
  with pytest.raises(ValueError, match=r"does not have: \['top.layers.2'\]"):
    build_model(SCHEMA, ModelConfig(dcnv2=SMALL), plan=PrecisionPlan(sites={"top.layers.2": fp8}))


def test_a_plan_made_for_other_shapes_is_refused(tmp_path):
  """A plan records its model's site shapes (Dispatch's do; train.probe's older files in their rows): a
  same-named site of another shape refuses it, since the errors and timings behind it were of the other."""
  m = build_model(SCHEMA, ModelConfig(dcnv2=SMALL))
  sites = gemm_sites(m)
  fp8 = SitePrecision.uniform("fp8_row")
  plan = PrecisionPlan(sites={"top.layers.0": fp8}, shapes={name: (k, n) for name, k, n in sites})
  assert PrecisionPlan.from_json(json.loads(json.dumps(plan.to_json()))).shapes == plan.shapes
  assert build_model(SCHEMA, ModelConfig(dcnv2=SMALL), plan=plan).top.layers[0].precision == fp8
  wider = DCNv2Config(embed_dim=4, bottom_mlp=(8,), num_cross=2, cross_rank=3, top_mlp=(32, 8))
  with pytest.raises(PlanError, match=r"other GEMM shapes \(K x N\): top.layers.0 \(12 x 16 in the plan's model, "
                                      r"12 x 32 here\); top.layers.1 \(16 x 8 in the plan's model, 32 x 8 here\)"):
    build_model(SCHEMA, ModelConfig(dcnv2=wider), plan=plan)
  # a probe file from before plans held shapes: they are read from its rows
  rows = [{"site": name, "gemm": g, "m": 64, "k": k, "n": n} for name, k, n in sites for g in ("fwd", "dgrad", "wgrad")]
  path = tmp_path / "precision_plan.json"
  path.write_text(json.dumps({"plan": PrecisionPlan(sites={"top.layers.0": fp8}).to_json(), "rows": rows}))
  assert PrecisionPlan.load(path).shapes == plan.shapes
  with pytest.raises(PlanError, match="other GEMM shapes"):
    build_model(SCHEMA, ModelConfig(dcnv2=wider, precision_plan=str(path)))
  for bad in ([12], [12, 0], [12, 16.0], "12x16"):
    with pytest.raises(ValueError, match=r"shapes\['top.layers.0'\] must be \[K, N\]"):
      PrecisionPlan.from_json({"sites": {}, "shapes": {"top.layers.0": bad}})


def test_precision_plan_spec(tmp_path):
  assert parse_precision_plan("") is None
  assert parse_precision_plan("uniform:fp8_row") == PrecisionPlan.uniform("fp8_row")
  assert parse_precision_plan("uniform:fp8_block:pallas") == PrecisionPlan.uniform("fp8_block", "pallas")
  plan = PrecisionPlan(sites={"top.layers.0": SitePrecision.uniform("fp8_tensor")})
  path = tmp_path / "precision_plan.json"
  path.write_text(json.dumps({"plan": plan.to_json(), "report": "probe output around the plan"}))
  m = build_model(SCHEMA, ModelConfig(precision_plan=str(path), dcnv2=SMALL))
  assert m.top.layers[0].precision == SitePrecision.uniform("fp8_tensor")
  for bad in ("uniform:fp9", "uniform:fp8_row:cuda", "uniform:"):
    with pytest.raises(ValueError, match="uniform:NUMERICS"):
      ModelConfig(precision_plan=bad)
  with pytest.raises(ValueError, match="give one"):
    build_model(SCHEMA, ModelConfig(precision_plan="uniform:bf16"), plan=plan)
  with pytest.raises(ValueError, match="logreg model has no GEMM sites"):
    build_model(SCHEMA, ModelConfig(kind="logreg", precision_plan="uniform:bf16"))


def test_command_line_takes_the_plan_and_the_norm():
  from train.ranker import Args
  args = parse_config(Args, ["--model.precision_plan", "uniform:fp8_row", "--model.dcnv2.norm", "layer"],
                      prog="train.ranker", description="")
  assert args.model.precision_plan == "uniform:fp8_row" and args.model.dcnv2.norm == "layer"


def test_norm_config_and_the_block_norm_spelling():
  assert DCNv2Config(block_norm=True).mlp_norm == "block" and DCNv2Config(norm="layer").mlp_norm == "layer"
  with pytest.raises(ValueError, match="conflicts with norm=layer"):
    DCNv2Config(block_norm=True, norm="layer")
  with pytest.raises(ValueError, match="none, layer or block"):
    DCNv2Config(norm="batch")  # type: ignore[arg-type]
  base = build_model(SCHEMA, ModelConfig(dcnv2=DCNv2Config(embed_dim=4, norm="layer", activation="silu")))
  assert base.top.norms is not None and base.bottom.norms is not None
  assert np.all(np.isfinite(np.asarray(base(_batch(SCHEMA)))))


def test_mods_ranker_fuses_its_hidden_layers_under_fp8():
  cfg = DCNv2Config(embed_dim=4, top_mlp=(256, 64), use_bias=False, norm="block", activation="hard_swish")
  m = build_model(SCHEMA, ModelConfig(dcnv2=cfg, precision_plan="uniform:fp8_row"))
  assert all(layer.fuses("block", "hard_swish") for layer in m.top.layers)


def _train(precision_plan: str, steps: int = 12) -> np.ndarray:
  mesh = sharding.make_mesh(1)
  cfg = ModelConfig(precision_plan=precision_plan,
                    dcnv2=DCNv2Config(embed_dim=8, bottom_mlp=(16,), top_mlp=(32,), cross_rank=4,
                                      compute_dtype="bfloat16"))
  optim = OptimConfig(dense_lr=3e-3, embedding_lr=0.1)
  tx = dense_optimizer(optim)
  graphdef, state, sh = create_train_state(lambda: build_model(TRAIN_SCHEMA, cfg), tx, mesh)
  bsh = batch_shardings(mesh, with_truth=False)
  step = make_train_step(graphdef, tx, optim, sh, bsh)
  losses = []
  for i in range(steps):
    state, m = step(state, jax.device_put(make_batch(i % 3), bsh))
    losses.append(float(m["loss"]))
  return np.array(losses)


def test_uniform_fp8_and_bf16_both_train_and_differ():
  bf16, fp8 = _train(""), _train("uniform:fp8_row")
  for losses in (bf16, fp8):
    assert np.all(np.isfinite(losses)) and losses[-3:].mean() < 0.8 * losses[:3].mean()
  assert bf16[0] != fp8[0]  # the FP8 GEMMs really run (not folded back to bf16)
  assert not np.allclose(bf16, fp8, rtol=1e-3)
  np.testing.assert_allclose(fp8, bf16, rtol=0.05)  # but learn the same thing
