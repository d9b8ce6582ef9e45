"""Errors for bad input data: they name the file, the line and the field."""

from __future__ import annotations


class DataFormatError(ValueError):
  """A data file could not be parsed.

  The message reads `PATH:LINE: field FIELD: what is wrong`, so a user can open the file at the
  right place. `line` is 1-based; None when the problem is not tied to one line.
  """

  def __init__(self, path: str, line: int | None, field: str | None, message: str):
    self.path, self.line, self.field, self.reason = str(path), line, field, message
    where = self.path if line is None else f"{self.path}:{line}"
    what = message if field is None else f"field {field}: {message}"
    super().__init__(f"{where}: {what}")


class DataSpecError(ValueError):
  """A `FORMAT:PATH[@SPLIT]` data spec (or a data config value) is malformed or names nothing."""
