"""Runs the `>>>` examples in the library's docstrings."""

import doctest
import importlib

import pytest

MODULES = ["jaxrec.layers.embedding", "jaxrec.metrics", "jaxrec.progress", "jaxrec.data.adsworld",
           "jaxrec.data.readers.criteo", "jaxrec.layers.blocknorm", "jaxrec.data.count_features", "jaxrec.ops.fp8_dense", "jaxrec.precision.plan",
           "jaxrec.ops.planned_dense", "jaxrec.ops.delayed_dense", "jaxrec.layers.dense", "jaxrec.models.factory", "serve.request",
           "serve.registry", "serve.metrics", "serve.loadgen", "jaxrec.interrupts"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
