"""jaxrec.config: command-line overrides of nested frozen dataclasses, help, errors, dict round trip."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Literal

import pytest

from jaxrec.config import config_from_dict, config_to_dict, parse_config


class Precision(enum.Enum):
  F32 = "f32"
  FP8 = "fp8"


@dataclasses.dataclass(frozen=True)
class Optim:
  lr: float = dataclasses.field(default=1e-3, metadata={"help": "peak learning rate"})
  schedule: Literal["cosine", "constant"] = "cosine"
  clip: float | None = None
  """Global gradient-norm clip; none turns it off."""


@dataclasses.dataclass(frozen=True)
class Model:
  hidden: tuple[int, ...] = (256, 128)  # widths of the MLP layers
  pair: tuple[int, float] = (1, 0.5)
  precision: Precision = Precision.F32
  optim: Optim = Optim()


@dataclasses.dataclass(frozen=True)
class Data:
  train: str = "synthetic"
  """Training data spec,
  FORMAT:PATH."""
  eval: str | None = None
  batch_size: int = 512

  def __post_init__(self):
    if self.batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class Config:
  data: Data = Data()
  model: Model = dataclasses.field(default_factory=lambda: Model(hidden=(64,)))
  steps: int = 100
  fresh: bool = False
  workdir: str = "runs/default"


@dataclasses.dataclass(frozen=True)
class Required:
  name: str
  size: int = 3


def _parse(*argv: str, **kwargs) -> Config:
  return parse_config(Config, list(argv), prog="train.test", description="Test entrypoint.", **kwargs)


def _error(capsys, *argv: str) -> str:
  with pytest.raises(SystemExit) as info:
    _parse(*argv)
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("train.test: error: "), err  # one line, no traceback
  return err


def test_no_arguments_give_the_defaults():
  assert _parse() == Config()
  assert _parse().model.hidden == (64,)  # the default_factory's instance, not Model()'s defaults


def test_nested_overrides_of_every_type():
  cfg = _parse(
      "--data.train", "criteo:/data/day_0", "--data.eval=none", "--data.batch-size", "1024",
      "--model.hidden", "512,256,1", "--model.pair=3,0.25", "--model.precision", "FP8",
      "--model.optim.lr=3e-4", "--model.optim.schedule", "constant", "--model.optim.clip", "1.5",
      "--steps=7", "--fresh", "--workdir", "out",
  )
  assert cfg == Config(
      data=Data(train="criteo:/data/day_0", eval=None, batch_size=1024),
      model=Model(hidden=(512, 256, 1), pair=(3, 0.25), precision=Precision.FP8,
                  optim=Optim(lr=3e-4, schedule="constant", clip=1.5)),
      steps=7, fresh=True, workdir="out",
  )
  assert isinstance(cfg.model.pair[1], float) and isinstance(cfg.steps, int)


@pytest.mark.parametrize(
    "argv, want",
    [
        (["--fresh"], True),
        (["--fresh", "--steps", "3"], True),
        (["--fresh", "false"], False),
        (["--fresh=No"], False),
        (["--fresh", "1"], True),
        (["--fresh=yes"], True),
        (["--fresh", "--no-fresh"], False),
    ],
)
def test_bool_spellings(argv, want):
  assert _parse(*argv).fresh is want


def test_later_overrides_win_and_empty_tuple_and_base():
  assert _parse("--steps", "1", "--steps", "2").steps == 2
  assert _parse("--model.hidden=").model.hidden == ()
  assert _parse("--model.optim.clip", "none").model.optim.clip is None
  base = Config(steps=5, data=Data(batch_size=8))
  cfg = _parse("--data.train", "x", base=base)
  assert (cfg.steps, cfg.data.batch_size, cfg.data.train) == (5, 8, "x")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data.trian", "x"], "unknown field --data.trian; did you mean --data.train?"),
        (["--batch_size", "8"], "unknown field --batch_size; did you mean --data.batch_size?"),
        (["--zzz"], "unknown field --zzz (see --help)"),
        (["--model.optim", "3"], "--model.optim is a group of fields; set one of them, e.g. --model.optim.lr"),
        (["--steps", "ten"], "--steps: expected int, got 'ten'"),
        (["--steps=1.5"], "--steps: expected int, got '1.5'"),
        (["--model.optim.lr", "fast"], "--model.optim.lr: expected float, got 'fast'"),
        (["--model.hidden", "1,x"], "--model.hidden: expected int, got '1,x'"),
        (["--model.pair", "1"], "--model.pair: expected 2 comma-separated values int,float, got '1'"),
        (["--model.optim.schedule", "cosin"], "expected one of {cosine,constant} (did you mean 'cosine'?)"),
        (["--model.precision", "fp16"], "expected one of {F32,FP8}"),
        (["--fresh=maybe"], "--fresh: expected bool (true/false/yes/no/1/0), got 'maybe'"),
        (["--steps"], "--steps needs a value of type int"),
        (["--workdir", ""], "--workdir needs a non-empty value (default 'runs/default')"),
        (["--data.train= "], "--data.train needs a non-empty value (default 'synthetic')"),
        (["--steps", "--fresh"], "--steps needs a value of type int"),
        (["--no-fresh=1"], "--no-fresh takes no value"),
        (["--no-steps"], "unknown field --no-steps"),
        (["steps", "3"], "unexpected argument 'steps'"),
        (["--data.batch_size", "0"], "invalid config: batch_size must be positive, got 0"),
    ],
)
def test_errors_print_one_line_and_exit_2(capsys, argv, message):
  assert message in _error(capsys, *argv)


def test_required_fields():
  assert parse_config(Required, ["--name", "a"], prog="p", description="") == Required("a")
  with pytest.raises(SystemExit) as info:
    parse_config(Required, [], prog="p", description="")
  assert info.value.code == 2


def test_help_lists_every_nested_field_with_type_default_and_doc(capsys):
  with pytest.raises(SystemExit) as info:
    _parse("--steps", "oops", "--help")
  assert info.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: train.test") and "Test entrypoint." in out
  for line in [
      "--data.train str  (default: synthetic)",
      "Training data spec, FORMAT:PATH.",  # attribute docstring, cleaned
      "--data.eval str | None  (default: none)",
      "--data.batch_size int  (default: 512)",
      "--model.hidden int,...  (default: 64)",
      "widths of the MLP layers",  # trailing comment
      "--model.pair int,float  (default: 1,0.5)",
      "--model.precision {F32,FP8}  (default: F32)",
      "--model.optim.lr float  (default: 0.001)",
      "peak learning rate",  # metadata help
      "--model.optim.schedule {cosine,constant}  (default: cosine)",
      "--model.optim.clip float | None  (default: none)",
      "Global gradient-norm clip; none turns it off.",
      "--fresh bool  (default: false)",
  ]:
    assert line in out, line
  with pytest.raises(SystemExit):
    parse_config(Required, ["-h"], prog="p", description="")
  assert "--name str  (required)" in capsys.readouterr().out


def test_dict_round_trip_through_json():
  cfg = _parse("--model.precision", "FP8", "--model.hidden", "3,2", "--data.eval", "x")
  d = config_to_dict(cfg)
  assert d["model"]["hidden"] == [3, 2] and d["model"]["precision"] == "FP8"
  assert config_from_dict(Config, json.loads(json.dumps(d))) == cfg
  assert config_from_dict(Config, {}) == Config()  # missing keys keep their defaults
  assert config_from_dict(Config, {"model": {"optim": {"lr": 1}}}).model.optim.lr == 1.0


@pytest.mark.parametrize(
    "d, message",
    [
        ({"stepz": 3}, "unknown field stepz; did you mean steps?"),
        ({"model": {"optim": {"lrr": 3}}}, "unknown field model.optim.lrr; did you mean model.optim.lr?"),
        ({"steps": "3"}, "config field steps: expected int, got '3'"),
        ({"steps": 3.0}, "config field steps: expected int"),
        ({"fresh": 1}, "config field fresh: expected bool"),
        ({"model": {"hidden": [1, "2"]}}, r"config field model.hidden\[1\]: expected int"),
        ({"model": {"pair": [1]}}, "config field model.pair: expected int,float"),
        ({"model": {"precision": "fp8"}}, "config field model.precision"),
        ({"model": {"optim": {"schedule": "linear"}}}, "config field model.optim.schedule"),
        ({"model": {"optim": {"lr": float("inf")}}}, "config field model.optim.lr: expected float, got inf"),
        ({"model": {"optim": {"lr": float("nan")}}}, "config field model.optim.lr: expected float, got nan"),
        ({"data": 3}, "config data: expected a dict"),
    ],
)
def test_from_dict_errors(d, message):
  with pytest.raises(ValueError, match=message):
    config_from_dict(Config, d)


def test_unsupported_field_type_is_a_type_error():
  @dataclasses.dataclass(frozen=True)
  class Bad:
    sizes: list = dataclasses.field(default_factory=list)

  with pytest.raises(TypeError, match="config field sizes: unsupported type"):
    parse_config(Bad, [], prog="p", description="")


def test_aliases_set_their_field_and_show_in_help(capsys):
  aliases = {"bs": "data.batch_size"}
  assert _parse("--bs", "64", aliases=aliases).data.batch_size == 64
  assert _parse("--bs=32", "--data.batch_size", "16", aliases=aliases).data.batch_size == 16  # later wins
  with pytest.raises(SystemExit):
    _parse("--help", aliases=aliases)
  assert "aliases: --bs = --data.batch_size" in capsys.readouterr().out
  with pytest.raises(TypeError, match="does not name a field"):
    _parse(aliases={"x": "data.nope"})


def test_ranker_accepts_the_issue_short_steps_flag():
  from train.ranker import ALIASES, Args
  args = parse_config(Args, ["--steps", "7"], prog="p", description="", aliases=ALIASES)
  assert args.train.steps == 7


def test_fixed_fields_are_left_out_of_help_and_refused(capsys):
  fixed = {"data": "the program reads its own data", "fresh": "set --workdir instead"}
  with pytest.raises(SystemExit):
    _parse("--help", fixed=fixed)
  out = capsys.readouterr().out
  assert "--data.batch_size" not in out and "  --fresh bool" not in out and "--steps int" in out
  assert "  --data.*  (the program reads its own data)" in out and "  --fresh  (set --workdir instead)" in out
  for argv in (["--data.batch_size", "8"], ["--no-fresh"]):
    with pytest.raises(SystemExit) as info:
      _parse(*argv, fixed=fixed)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "is not an option here: the program sets it" in err and err.count("\n") == 1
  assert _parse("--steps", "5", fixed=fixed).steps == 5
  with pytest.raises(TypeError, match="names no field or group"):
    _parse(fixed={"nope": "x"})
