"""Where the real datasets live: `$JAXREC_DATA_DIR`, else `<repo>/../shared/data`.

The data files are never part of the repository (their licences forbid redistribution); tests
and entrypoints find them through `default_data_dir` and `require_data`.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxrec.data.errors import DataFormatError

DATA_DIR_ENV = "JAXREC_DATA_DIR"


def default_data_dir() -> Path:
  """`$JAXREC_DATA_DIR` when set and non-empty, else `<repo>/../shared/data` (may not exist)."""
  env = os.environ.get(DATA_DIR_ENV, "").strip()
  if env:
    return Path(env).expanduser()
  return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def require_data(rel: str) -> Path:
  """`default_data_dir() / rel`, or DataFormatError saying where it looked and how to point elsewhere."""
  path = default_data_dir() / rel
  if not path.exists():
    raise DataFormatError(str(path), None, None,
                          f"real data not found; set {DATA_DIR_ENV} to the folder that holds {rel!r}")
  return path
