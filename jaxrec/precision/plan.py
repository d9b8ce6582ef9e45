"""A precision plan: which numerics each GEMM site of a model runs, forward and gradients separately.

A GEMM site is one dense layer y = x @ w (+ b) of a model, named by its module path with dots,
e.g. "top.layers.0" or "cross.layers.1.v". Each site runs three GEMMs (jaxrec.precision.GEMMS):

    fwd    y  = x  @ w       [B, K] x [K, N]
    dgrad  dx = dy @ w.T     [B, N] x [N, K]
    wgrad  dw = x.T @ dy     [K, B] x [B, N]

and each GEMM gets a `GemmChoice`: a numerics name ("f32", "bf16", "fp8_tensor", "fp8_row",
"fp8_block", "fp8_delayed") and, for fp8, the implementation ("xla" or "pallas"). The plan is an
explicit argument of model construction (never a global): sites it does not name use `default`.
A plan may record the (K, N) of each site of the model it was made for (`shapes`; Dispatch's plans
do): a model whose same-named site has another shape refuses it, since the Probe's errors and
Dispatch's timings were of the other shape.

"fp8_tensor" / "fp8_row" / "fp8_block" scale each operand from its current amax
(jaxrec.ops.fp8_dense); "fp8_delayed" is per-tensor FP8 whose scales come from an amax history
over earlier steps (jaxrec.ops.delayed_dense; the histories live in the train state). A site is
delayed for all three GEMMs or for none: the history covers the operands the GEMMs share. The
Probe's error model and Dispatch score the current-scaling recipes; delayed scaling is a
training recipe chosen by hand (e.g. --model.precision_plan uniform:fp8_delayed).

>>> plan = PrecisionPlan(sites={"top.layers.0": SitePrecision.uniform("fp8_row")})
>>> plan.site("top.layers.0").fwd.numerics, plan.site("top.layers.1").fwd.numerics
('fp8_row', 'bf16')
>>> PrecisionPlan.from_json(plan.to_json()) == plan
True
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

NUMERICS = ("f32", "bf16", "fp8_tensor", "fp8_row", "fp8_block", "fp8_delayed")
IMPLS = ("xla", "pallas")
GEMMS = ("fwd", "dgrad", "wgrad")


@dataclasses.dataclass(frozen=True)
class GemmChoice:
  numerics: str = "bf16"
  """f32, bf16, fp8_tensor, fp8_row, fp8_block or fp8_delayed"""
  impl: str = "xla"
  """xla, or pallas (the jaxrec kernels; fp8 numerics only)"""

  def __post_init__(self):
    if self.numerics not in NUMERICS:
      raise ValueError(f"unknown GEMM numerics {self.numerics!r}; choose one of {NUMERICS}")
    if self.impl not in IMPLS:
      raise ValueError(f"unknown GEMM impl {self.impl!r}; choose one of {IMPLS}")
    if self.impl == "pallas" and not self.is_fp8:
      raise ValueError(f"impl 'pallas' runs fp8 numerics only, got {self.numerics!r}")

  @property
  def is_fp8(self) -> bool:
    return self.numerics.startswith("fp8_")

  @property
  def is_delayed(self) -> bool:
    return self.numerics == "fp8_delayed"

  @property
  def recipe(self) -> str | None:
    """The fp8 scaling recipe ("tensor", "row", "block", "delayed"), or None for f32/bf16."""
    return self.numerics[4:] if self.is_fp8 else None


@dataclasses.dataclass(frozen=True)
class SitePrecision:
  fwd: GemmChoice = GemmChoice()
  dgrad: GemmChoice = GemmChoice()
  wgrad: GemmChoice = GemmChoice()

  def __post_init__(self):
    delayed = [g for g in GEMMS if self.gemm(g).is_delayed]
    if delayed and (len(delayed) != 3 or len({self.gemm(g).impl for g in GEMMS}) != 1):
      raise ValueError("fp8_delayed applies to a whole site (its amax history covers the operands its "
                       f"three GEMMs share), with one impl: got {self}")

  @property
  def is_delayed(self) -> bool:
    return self.fwd.is_delayed

  @classmethod
  def uniform(cls, numerics: str, impl: str = "xla") -> "SitePrecision":
    c = GemmChoice(numerics, impl)
    return cls(c, c, c)

  def gemm(self, which: str) -> GemmChoice:
    if which not in GEMMS:
      raise ValueError(f"unknown GEMM {which!r}; choose one of {GEMMS}")
    return getattr(self, which)

  @property
  def any_fp8(self) -> bool:
    return any(self.gemm(g).is_fp8 for g in GEMMS)


class PlanError(ValueError):
  """A precision plan that cannot apply: a bad file, or sites the model does not have."""


class PlanFileError(PlanError):
  """A precision plan file that is missing, unreadable or malformed."""


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
  sites: dict[str, SitePrecision] = dataclasses.field(default_factory=dict)
  default: SitePrecision = SitePrecision()
  shapes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict, compare=False)
  """(K, N) of sites of the model the plan was made for, where known. Not part of equality: the
  same choices are the same plan, whether or not a copy recorded the shapes."""

  def site(self, name: str) -> SitePrecision:
    return self.sites.get(name, self.default)

  def uses_pallas(self) -> bool:
    """Whether any GEMM runs the jaxrec Pallas kernels (which need a GPU)."""
    return any(s.gemm(g).impl == "pallas" for s in (self.default, *self.sites.values()) for g in GEMMS)

  def check_backend(self, backend: str, given: str) -> None:
    """PlanError when the plan (`given`: where it came from, e.g. a flag and its value) runs the Pallas
    kernels and `backend` (jax.default_backend()) is not a GPU: refused before training or timing."""
    if self.uses_pallas() and backend != "gpu":
      raise PlanError(f"{given} runs the jaxrec Pallas kernels, which need a GPU (sm90); the backend here is "
                      f"{backend!r}: use the xla impl (e.g. uniform:fp8_row)")

  def __hash__(self) -> int:  # frozen + dict field: hash by content so plans can be static args
    return hash((tuple(sorted(self.sites.items())), self.default))

  @classmethod
  def uniform(cls, numerics: str, impl: str = "xla") -> "PrecisionPlan":
    """Every site (named or not) runs `numerics` for all three GEMMs."""
    return cls(default=SitePrecision.uniform(numerics, impl))

  def check_sites(self, sites: Sequence[tuple[str, int, int]]) -> None:
    """Raises PlanError naming plan sites that the model's (name, K, N) `sites` lack, or whose
    recorded shape differs from the model's (a stale or foreign plan)."""
    known = {name: (k, n) for name, k, n in sites}
    unknown = sorted(set(self.sites) - set(known))
    if unknown:
      raise PlanError(f"precision plan names GEMM sites the model does not have: {unknown}; "
                       f"the model's sites are {sorted(known)}")
    other = [f"{name} ({k} x {n} in the plan's model, {known[name][0]} x {known[name][1]} here)"
             for name, (k, n) in sorted(self.shapes.items()) if name in known and known[name] != (k, n)]
    if other:
      raise PlanError(f"precision plan was made for a model with other GEMM shapes (K x N): {'; '.join(other)}; "
                       "probe this model (python -m train.probe) for its own plan")

  def to_json(self) -> dict:
    out = {"default": dataclasses.asdict(self.default),
           "sites": {k: dataclasses.asdict(v) for k, v in sorted(self.sites.items())}}
    if self.shapes:
      out["shapes"] = {k: list(v) for k, v in sorted(self.shapes.items())}
    return out

  @classmethod
  def from_json(cls, d: dict) -> "PrecisionPlan":
    """The plan of `to_json`'s {"default": ..., "sites": ..., "shapes": ...} ("shapes" optional;
    "default" or "sites" may be left out, not both); ValueError for other keys, so that another JSON
    file is not read as an all-bf16 plan."""
    def site(s: dict) -> SitePrecision:
      return SitePrecision(**{g: GemmChoice(**s[g]) for g in GEMMS})

    def shape(name: str, v) -> tuple[int, int]:
      if not (isinstance(v, list) and len(v) == 2 and all(type(x) is int and x > 0 for x in v)):
        raise ValueError(f"shapes[{name!r}] must be [K, N] (two positive integers), got {v!r}")
      return v[0], v[1]

    if not isinstance(d, dict) or not d.keys() & {"default", "sites"} or d.keys() - {"default", "sites", "shapes"}:
      raise ValueError(f"a precision plan is a JSON object with keys 'default' and 'sites' (and optionally "
                       f"'shapes'), got {sorted(d) if isinstance(d, dict) else type(d).__name__}")
    return cls(sites={k: site(v) for k, v in d.get("sites", {}).items()},
               default=site(d["default"]) if "default" in d else SitePrecision(),
               shapes={k: shape(k, v) for k, v in d.get("shapes", {}).items()})

  def save(self, path: str | Path) -> None:
    Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

  @classmethod
  def load(cls, path: str | Path) -> "PrecisionPlan":
    """Reads a plan JSON (precision_plan.json's "plan" entry or a bare plan); PlanFileError (a
    ValueError) when the file is missing, is not JSON, or does not hold a plan."""
    p = Path(path)
    try:
      d = json.loads(p.read_text())
    except FileNotFoundError:
      raise PlanFileError(f"precision plan {p}: no such file (give train.probe's precision_plan.json, "
                          "or uniform:NUMERICS)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise PlanFileError(f"precision plan {p}: not a readable JSON file ({e})") from None
    try:
      plan = cls.from_json(d.get("plan", d))
      if "plan" in d and "rows" in d and not plan.shapes:  # train.probe's file from before plans held shapes
        plan = dataclasses.replace(plan, shapes={r["site"]: (int(r["k"]), int(r["n"])) for r in d["rows"]})
      return plan
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise PlanFileError(f"precision plan {p}: not a precision plan ({type(e).__name__}: {e})") from None
