"""Shared fixtures: where the real datasets are (tests that need them carry `@pytest.mark.realdata`)."""

import os

# 8 host devices, so the data-parallel / sharded-embedding tests can build meshes of 1 and 8
# devices in one process. Must be set before jax is imported anywhere.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from pathlib import Path

import pytest

# Strict dtype promotion (../shared/STYLE.md 14) is not switched on for the whole suite: optax
# 0.2.8's Adam bias correction computes `float ** int32 count`, which strict promotion rejects
# inside optax itself (TypePromotionError in optax/tree_utils/_tree_math.py).

from jaxrec.data.paths import default_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
  """The real-data folder ($JAXREC_DATA_DIR, else <repo>/../shared/data); skips the test when absent."""
  path = default_data_dir()
  if not path.is_dir():
    pytest.skip(f"real data folder {path} absent")
  return path
