import jax
import pytest


@pytest.fixture(autouse=True)
def strict_dtype_promotion():
  """Layer code must not rely on implicit dtype promotion (see tests/conftest.py for why the
  whole suite cannot run this way)."""
  with jax.numpy_dtype_promotion("strict"):
    yield
