"""Typed, frozen config dataclasses, overridden from the command line and saved as JSON.

An entrypoint declares one frozen dataclass whose fields are leaves or nested frozen dataclasses:

    @dataclasses.dataclass(frozen=True)
    class Data:
      train: str = "synthetic"
      '''Data spec FORMAT:PATH of the training split.'''
      batch_size: int = 512  # examples per step

    @dataclasses.dataclass(frozen=True)
    class Config:
      data: Data = Data()
      lr: float = dataclasses.field(default=1e-3, metadata={"help": "peak learning rate"})

    cfg = parse_config(Config, prog="train.ranker", description="Trains the ranker.")

and is run as `python -m train.ranker --data.batch_size 1024 --lr=3e-4`. `--help` lists every field
with its type, default and doc (from `metadata={"help": ...}`, else the string literal under the
field, else the comment at the end of its line).

Leaf types: int, float, str, bool, Literal[...], an Enum (by member name), tuple[X, ...] or
tuple[X, Y] of those (comma-separated: `--sizes 64,32`, the empty string for `()`), and `X | None`
(the word `none` gives None). Bools take true/false/yes/no/1/0; a bare `--flag` means true and
`--no-flag` false. Dashes and underscores in names are interchangeable.

Mistakes (unknown field, unparsable value, missing value) print one line `PROG: error: ...` with the
field, the expected type and a suggestion to stderr, and exit with status 2, as argparse does.
Unsupported field types are a bug in the config class and raise TypeError.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import enum
import functools
import inspect
import io
import math
import sys
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")

_MISSING = dataclasses.MISSING
_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})
_NONE = frozenset({"none", "null"})


class _BadValue(ValueError):
  """Text that does not parse as a field's type; the message says what was expected."""


@dataclasses.dataclass(frozen=True)
class _Leaf:
  name: str  # dotted path from the root config, e.g. "data.batch_size"
  tp: Any
  default: Any  # _MISSING when the field is required
  help: str


def _is_config(tp: Any) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _optional_arg(tp: Any) -> Any | None:
  """X for `X | None` (or Optional[X]), else None."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(tp)) == 2:
      return args[0]
  return None


def _is_scalar(tp: Any) -> bool:
  if tp in (int, float, str, bool) or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
    return True
  args = typing.get_args(tp)
  return typing.get_origin(tp) is Literal and all(isinstance(a, (int, str, bool)) for a in args)


def _check_type(tp: Any, where: str) -> None:
  """Raises TypeError unless `tp` is a supported leaf type (a bug in the config class, not the user's)."""
  if (inner := _optional_arg(tp)) is not None:
    tp = inner
  args = typing.get_args(tp)
  if _is_scalar(tp):
    return
  if typing.get_origin(tp) is tuple and args and Ellipsis not in args[:-1] and args != (Ellipsis,):
    if all(_is_scalar(a) for a in args if a is not Ellipsis) and (args[-1] is not Ellipsis or len(args) == 2):
      return
  raise TypeError(f"config field {where}: unsupported type {tp!r}; use int, float, str, bool, Literal, an "
                  "Enum, a tuple of those, X | None, or a nested dataclass")


def _type_name(tp: Any) -> str:
  if (inner := _optional_arg(tp)) is not None:
    return f"{_type_name(inner)} | None"
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin is Literal:
    return "{" + ",".join(_format(a) for a in args) + "}"
  if origin is tuple:
    if args[-1] is Ellipsis:
      return f"{_type_name(args[0])},..."
    return ",".join(_type_name(a) for a in args)
  if isinstance(tp, type) and issubclass(tp, enum.Enum):
    return "{" + ",".join(tp.__members__) + "}"
  return tp.__name__


def _format(value: Any) -> str:
  """A value written the way the command line takes it."""
  if value is None:
    return "none"
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, enum.Enum):
    return value.name
  if isinstance(value, tuple):
    return ",".join(_format(v) for v in value)
  return str(value)


def _parse(tp: Any, text: str) -> Any:
  """Parses command-line text as `tp`; raises _BadValue naming the expected type."""
  if (inner := _optional_arg(tp)) is not None:
    return None if text.strip().lower() in _NONE else _parse(inner, text)
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin is Literal:
    for choice in args:
      if _format(choice) == text or (isinstance(choice, bool) and text.lower() == _format(choice)):
        return choice
    close = difflib.get_close_matches(text, [_format(a) for a in args], n=1)
    raise _BadValue(f"one of {_type_name(tp)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
  if origin is tuple:
    parts = [] if not text.strip() else [s.strip() for s in text.split(",")]
    if args[-1] is Ellipsis:
      return tuple(_parse(args[0], s) for s in parts)
    if len(parts) != len(args):
      raise _BadValue(f"{len(args)} comma-separated values {_type_name(tp)}")
    return tuple(_parse(a, s) for a, s in zip(args, parts))
  if isinstance(tp, type) and issubclass(tp, enum.Enum):
    if text in tp.__members__:
      return tp[text]
    close = difflib.get_close_matches(text, list(tp.__members__), n=1)
    raise _BadValue(f"one of {_type_name(tp)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
  if tp is bool:
    if text.lower() in _TRUE | _FALSE:
      return text.lower() in _TRUE
    raise _BadValue("bool (true/false/yes/no/1/0)")
  try:
    value = tp(text.strip()) if tp in (int, float) else text
  except ValueError:
    raise _BadValue(tp.__name__) from None
  if tp is float and not math.isfinite(value):  # NaN passes every `x < 0` check of a __post_init__, inf
    raise _BadValue("float (a finite number)")    # every `x > 0` one: no config field means either
  return value


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
  """Attribute docstrings and trailing comments of `cls` and its dataclass bases, by field name."""
  docs: dict[str, str] = {}
  for klass in reversed(cls.__mro__):
    if not dataclasses.is_dataclass(klass):
      continue
    try:
      source = textwrap.dedent(inspect.getsource(klass))
      tree = ast.parse(source)
      comments = {t.start[0]: t.string.lstrip("#").strip()
                  for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
      continue  # no source (REPL, exec): fields go undocumented
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, after in zip(body, body[1:] + [None]):
      if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
        continue
      if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
        docs[node.target.id] = inspect.cleandoc(after.value.value)
      elif node.end_lineno in comments:
        docs[node.target.id] = comments[node.end_lineno]
  return docs


def _leaves(cls: type, value: Any, prefix: str = "") -> list[_Leaf]:
  """The leaf fields under `cls`, with defaults read from `value` (an instance, or _MISSING)."""
  hints = typing.get_type_hints(cls)
  docs = _field_docs(cls)
  out = []
  for f in dataclasses.fields(cls):
    if not f.init:
      continue
    name, tp = prefix + f.name, hints[f.name]
    if value is not _MISSING:
      default = getattr(value, f.name)
    elif f.default is not _MISSING:
      default = f.default
    elif f.default_factory is not _MISSING:
      default = f.default_factory()
    else:
      default = _MISSING
    if _is_config(tp):
      out += _leaves(tp, default, name + ".")
    else:
      _check_type(tp, name)
      out.append(_Leaf(name, tp, default, f.metadata.get("help") or docs.get(f.name, "")))
  return out


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
  kwargs = {}
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if f.init:
      name = prefix + f.name
      kwargs[f.name] = _build(hints[f.name], values, name + ".") if _is_config(hints[f.name]) else values[name]
  return cls(**kwargs)


def _fixed_hint(name: str, fixed: dict[str, str]) -> str | None:
  """The hint of the `fixed` entry that names field `name` or a group holding it, else None."""
  return next((hint for f, hint in fixed.items() if name == f or name.startswith(f + ".")), None)


def _help(leaves: list[_Leaf], prog: str, description: str, fixed: dict[str, str]) -> str:
  lines = [f"usage: {prog} [-h] [--FIELD VALUE | --FIELD=VALUE ...]", ""]
  if description:
    lines += [description.strip(), ""]
  lines.append("fields (a bool also takes a bare --FIELD for true, --no-FIELD for false):")
  for leaf in leaves:
    if _fixed_hint(leaf.name, fixed) is not None:
      continue
    default = "required" if leaf.default is _MISSING else f"default: {_format(leaf.default) or repr('')}"
    lines.append(f"  --{leaf.name} {_type_name(leaf.tp)}  ({default})")
    for para in leaf.help.split("\n\n"):  # each paragraph re-wrapped
      lines += textwrap.wrap(" ".join(para.split()), 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
  if fixed:
    lines.append("set by the program, not options:")
    for f, hint in fixed.items():
      group = any(leaf.name.startswith(f + ".") for leaf in leaves)
      lines.append(f"  --{f}{'.*' if group else ''}  ({hint})")
  return "\n".join(lines) + "\n"


def _fail(prog: str, message: str) -> typing.NoReturn:
  print(f"{prog}: error: {message} (see --help)", file=sys.stderr)
  sys.exit(2)


def parse_config(cls: type[T], argv: list[str] | None = None, *, prog: str, description: str,
                 base: T | None = None, aliases: dict[str, str] | None = None,
                 fixed: dict[str, str] | None = None) -> T:
  """Builds a `cls` from its defaults (or from `base`, e.g. a smoke config) and `--a.b VALUE` overrides.

  argv: the arguments without the program name; None reads sys.argv[1:].
  aliases: short spellings of fields, e.g. {"steps": "train.steps"} makes `--steps N` set train.steps.
  fixed: {field or group: hint} for fields the program sets itself (e.g. a nested run config's
  workdir): left out of --help (listed apart with the hint), and refused on the command line.
  `--help` prints every field and exits 0; a bad argument prints one line to stderr and exits 2.
  """
  if not _is_config(cls):
    raise TypeError(f"parse_config: {cls!r} is not a dataclass")
  argv = sys.argv[1:] if argv is None else list(argv)
  leaves = _leaves(cls, _MISSING if base is None else base)
  by_name = {leaf.name: leaf for leaf in leaves}
  groups = {leaf.name.rsplit(".", 1)[0] for leaf in leaves if "." in leaf.name}
  groups |= {g.rsplit(".", i)[0] for g in groups for i in range(g.count(".") + 1)}
  values = {leaf.name: leaf.default for leaf in leaves}
  aliases = dict(aliases or {})
  fixed = dict(fixed or {})
  for f in fixed:
    if f not in by_name and f not in groups:
      raise TypeError(f"parse_config: fixed --{f} names no field or group")
  for short, full in aliases.items():
    if full not in by_name or short in by_name:
      raise TypeError(f"parse_config: alias --{short} -> --{full} does not name a field or shadows one")
  if "-h" in argv or "--help" in argv:
    print(_help(leaves, prog, description, fixed), end="")
    if aliases:
      print("aliases: " + ", ".join(f"--{a} = --{f}" for a, f in aliases.items()))
    sys.exit(0)
  i = 0
  while i < len(argv):
    arg = argv[i]
    i += 1
    if not arg.startswith("--") or len(arg) == 2:
      _fail(prog, f"unexpected argument {arg!r}; overrides look like --FIELD VALUE or --FIELD=VALUE")
    raw, has_value, text = arg[2:].partition("=")
    name = raw.replace("-", "_")
    name = aliases.get(name, name)
    negated = name not in by_name and name.startswith("no_") and name[3:] in by_name
    negated = negated and by_name[name[3:]].tp is bool
    if negated:
      name = name[3:]
    leaf = by_name.get(name)
    if leaf is None:
      if name in groups:
        inside = [n for n in by_name if n.startswith(name + ".")]
        _fail(prog, f"--{name} is a group of fields; set one of them, e.g. --{inside[0]}")
      close = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.6)
      _fail(prog, f"unknown field --{raw}" + (f"; did you mean --{close[0]}?" if close else ""))
    if (hint := _fixed_hint(name, fixed)) is not None:
      _fail(prog, f"--{name} is not an option here: the program sets it ({hint})")
    if negated:
      if has_value:
        _fail(prog, f"--no-{name} takes no value")
      values[name] = False
      continue
    if not has_value:
      next_is_value = i < len(argv) and not argv[i].startswith("--")
      if leaf.tp is bool and not (next_is_value and argv[i].lower() in _TRUE | _FALSE):
        values[name] = True
        continue
      if not next_is_value:
        _fail(prog, f"--{name} needs a value of type {_type_name(leaf.tp)}")
      text = argv[i]
      i += 1
    if leaf.tp is str and not text.strip() and isinstance(leaf.default, str) and leaf.default:
      # a field with a non-empty default gives "" no meaning: `--workdir ""` would write into the current directory
      _fail(prog, f"--{name} needs a non-empty value (default {leaf.default!r})")
    try:
      values[name] = _parse(leaf.tp, text)
    except _BadValue as e:
      _fail(prog, f"--{name}: expected {e}, got {text!r}")
  missing = [n for n, v in values.items() if v is _MISSING]
  if missing:
    _fail(prog, "missing required " + ", ".join(f"--{n} {_type_name(by_name[n].tp)}" for n in missing))
  try:
    return _build(cls, values)
  except ValueError as e:  # a __post_init__ check of the config class
    _fail(prog, f"invalid config: {e}")


def _to_json(value: Any) -> Any:
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
  if isinstance(value, enum.Enum):
    return value.name
  if isinstance(value, tuple):
    return [_to_json(v) for v in value]
  return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
  """Nested dict of JSON types (tuples become lists, enums their member names)."""
  if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
    raise TypeError(f"config_to_dict: {cfg!r} is not a dataclass instance")
  return _to_json(cfg)


def _from_json(tp: Any, value: Any, name: str) -> Any:
  """Checks and converts one JSON value to `tp`; raises ValueError naming the field."""
  bad = ValueError(f"config field {name}: expected {_type_name(tp)}, got {value!r}")
  if (inner := _optional_arg(tp)) is not None:
    return None if value is None else _from_json(inner, value, name)
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin is Literal:
    if any(value == a and type(value) is type(a) for a in args):
      return value
    raise bad
  if origin is tuple:
    if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
      raise bad
    kinds = [args[0]] * len(value) if args[-1] is Ellipsis else args
    return tuple(_from_json(a, v, f"{name}[{k}]") for k, (a, v) in enumerate(zip(kinds, value)))
  if isinstance(tp, type) and issubclass(tp, enum.Enum):
    if isinstance(value, str) and value in tp.__members__:
      return tp[value]
    raise bad
  if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    if not math.isfinite(value):  # json.loads reads NaN and Infinity
      raise bad
    return float(value)
  if type(value) is tp:
    return value
  raise bad


def config_from_dict(cls: type[T], d: dict[str, Any]) -> T:
  """Inverse of `config_to_dict`. Fields absent from `d` keep their defaults (so configs saved before a
  field was added still load); unknown keys and values of the wrong type raise ValueError."""
  if not _is_config(cls):
    raise TypeError(f"config_from_dict: {cls!r} is not a dataclass")
  return _from_dict(cls, d, "")


def _from_dict(cls: type[T], d: Any, prefix: str) -> T:
  if not isinstance(d, dict):
    raise ValueError(f"config {prefix.rstrip('.') or cls.__name__}: expected a dict, got {d!r}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    close = difflib.get_close_matches(unknown[0], list(fields), n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    raise ValueError(f"config {cls.__name__}: unknown field {prefix}{unknown[0]}{hint}")
  kwargs = {}
  for name, value in d.items():
    tp = hints[name]
    if _is_config(tp):
      kwargs[name] = _from_dict(tp, value, prefix + name + ".")
    else:
      _check_type(tp, prefix + name)
      kwargs[name] = _from_json(tp, value, prefix + name)
  return cls(**kwargs)
