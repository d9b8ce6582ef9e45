"""Every entrypoint that writes a directory says so clearly (exit 2) when it cannot create it."""

import importlib

import pytest

CASES = [
    ("train.ranker", ["--workdir", "{f}"]),
    ("train.user_model", ["--workdir", "{f}"]),
    ("train.probe", ["--workdir", "{f}"]),
    ("train.fp8_study", ["--workdir", "{f}"]),
    ("train.sum_study", ["--workdir", "{f}"]),
    ("train.bench_precision", ["--run", "{tmp}", "--out", "{f}"]),
]


@pytest.mark.parametrize("module,argv", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_an_unusable_output_directory_is_a_clear_error(tmp_path, capsys, module, argv, where):
  blocker = tmp_path / "blocker"
  blocker.write_text("not a directory")
  target = blocker if where == "a_file" else blocker / "sub"
  main = importlib.import_module(module).main
  assert main([a.format(f=target, tmp=tmp_path) for a in argv]) == 2
  err = capsys.readouterr().err
  assert f"cannot use {target} as an output directory" in err, err
  assert blocker.read_text() == "not a directory"
