"""Data specs, batch sources and the grain pipeline."""

import numpy as np
import pytest

from jaxrec.data.adsworld import AdsWorldConfig
from jaxrec.data.batch import Schema, SparseFeature
from jaxrec.data.errors import DataFormatError, DataSpecError
from jaxrec.data.examples import Examples
from jaxrec.data.pipeline import ExamplesSource, train_iterator
from jaxrec.data.readers._common import one_hot_batch
from jaxrec.data.sources import AdsWorldSource, DataConfig, DataSpec, _world, open_train_eval, parse_spec
from jaxrec.data import readers


def test_parse_spec_forms():
  assert parse_spec("adsworld") == DataSpec("adsworld", "train", "all")
  assert parse_spec("adsworld:eval") == DataSpec("adsworld", "eval", "all")
  assert parse_spec("libfm:a/b.libfm@train") == DataSpec("libfm", "a/b.libfm", "train")
  assert parse_spec("criteo:/x/y.txt") == DataSpec("criteo", "/x/y.txt", "all")


@pytest.mark.parametrize("spec,msg", [("parquet:x", "unknown format"), ("criteo:", "needs a path"),
                                      ("libfm:x@test", "split must be one of"),
                                      ("adsworld:train@train", "'train@train' is not an ads-world stream name"),
                                      ("adsworld:a b", "takes no @SPLIT and no file")])
def test_bad_specs_are_clear(spec, msg):
  with pytest.raises(DataSpecError, match=msg):
    parse_spec(spec)


def test_eval_defaults_and_same_data_refused():
  with pytest.raises(DataSpecError, match="no eval data"):
    open_train_eval(DataConfig(train="criteo:whatever.txt"))
  with pytest.raises(DataSpecError, match="same data"):
    open_train_eval(DataConfig(train="adsworld:eval", eval="adsworld:eval"))


def test_train_and_eval_sharing_rows_refused(tmp_path):
  f = tmp_path / "d.libfm"
  f.write_text("".join(f"{i % 2} {i % 7}:1 {7 + i % 5}:1\n" for i in range(40)))
  other_spelling = tmp_path / "sub" / ".." / "d.libfm"
  (tmp_path / "sub").mkdir()
  for train, evl in [(f"libfm:{f}", f"libfm:{f}@eval"),  # @all holds every @eval row
                     (f"libfm:{f}@train", f"libfm:{other_spelling}@train"),
                     (f"libfm:{f}@eval", f"libfm:{f}")]:
    with pytest.raises(DataSpecError, match="share rows"):
      open_train_eval(DataConfig(train=train, eval=evl, batch_size=8))
  tr, ev = open_train_eval(DataConfig(train=f"libfm:{f}@train", eval=f"libfm:{other_spelling}@eval", batch_size=8))
  assert len(tr) + len(ev) == 40


def test_split_leaving_a_side_empty_is_refused(tmp_path):
  """An empty @eval split used to train and then fail with a KeyError for the missing eval metrics."""
  f = tmp_path / "tiny.libfm"
  f.write_text("1 1:1 3:1\n0 2:1 4:1\n")
  with pytest.raises(DataSpecError, match="leaves the eval split empty"):
    open_train_eval(DataConfig(train=f"libfm:{f}@train", batch_size=1))
  with pytest.raises(DataSpecError, match="leaves the train split empty"):
    open_train_eval(DataConfig(train=f"libfm:{f}@train", batch_size=1, eval_fraction=0.8))
  tr, ev = open_train_eval(DataConfig(train=f"libfm:{f}@train", batch_size=1, eval_fraction=0.5))
  assert len(tr) == len(ev) == 1


def test_seeded_split_partitions_the_rows_and_depends_on_the_seed():
  """Examples.split: disjoint train and eval that cover every row, eval_fraction of them in eval,
  the same rows for the same seed and other rows for another (DataConfig.split_seed)."""
  n = 200
  schema = Schema(dense=("t",), sparse=(SparseFeature("user", 5),), labels=("click",))
  ex = Examples(schema, one_hot_batch(dense=np.arange(n, dtype=np.float32)[:, None], ids=np.zeros((n, 1), np.int64),
                                      mask=None, labels=np.zeros((n, 1), np.float32), timestamp=np.arange(n)))

  def rows(seed):
    tr, ev = ex.split(0.25, seed)
    return tr.data.dense[:, 0].tolist(), ev.data.dense[:, 0].tolist()
  tr, ev = rows(3)
  assert len(ev) == 50 and sorted(tr + ev) == list(range(n)) and not set(tr) & set(ev)
  assert rows(3) == (tr, ev)
  assert rows(4)[1] != ev and rows(0)[1] != ev


def test_train_and_eval_files_share_one_vocabulary(tmp_path):
  """Readers size vocabularies by their own file; an eval file that reaches further (as Ali-CCP's own
  val file does) widens the training vocabulary instead of being refused."""
  header = "click,purchase,101,205,301,D508"
  tr = tmp_path / "train.csv"
  tr.write_text("\n".join([header, "0,0,3,7,1,0.5", "1,0,1,2,1,0.25", "1,1,0,0,1,0.0"]) + "\n")
  ev = tmp_path / "val.csv"
  ev.write_text("\n".join([header, "0,0,5,2,1,0.5", "1,1,0,9,1,0.1"]) + "\n")
  for counts in ((), ("205",)):
    train, evl = open_train_eval(DataConfig(train=f"aliccp:{tr}", eval=f"aliccp:{ev}", batch_size=2,
                                            count_features=counts))
    assert [(f.name, f.vocab_size) for f in train.schema.sparse] == [("101", 6), ("205", 10), ("301", 2)]
    assert train.schema == evl.schema and len(train) == 3 and len(evl) == 2


def test_adsworld_train_and_eval_streams_differ():
  cfg = DataConfig(eval_examples=1000, world=AdsWorldConfig())
  train, evl = open_train_eval(cfg)
  a = train.train_batch(0, 256)
  b = next(iter(evl.eval_batches(256)))
  assert a.sparse.shape == b.sparse.shape and not np.array_equal(a.sparse, b.sparse)
  assert sum(x.weights.sum() for x in evl.eval_batches(256)) == 1024  # whole batches of the stream


def test_adsworld_eval_batches_spread_over_the_training_span():
  """Eval batches are spaced evenly over the first span_examples of the stream (the period training saw),
  not the stream's first batches; without a span they are its first batches."""
  world = _world(AdsWorldConfig.small())
  spread = AdsWorldSource(world, "eval", eval_examples=1000, span_examples=40 * 256)
  got = list(spread.eval_batches(256))
  assert len(got) == 4 and spread.eval_examples_read(256) == 31 * 256
  for b, i in zip(got, (0, 10, 20, 30)):
    np.testing.assert_array_equal(b.sparse, world.batch("eval", i, 256).sparse)
  first = AdsWorldSource(world, "eval", eval_examples=1000)
  assert first.eval_examples_read(256) == 4 * 256
  np.testing.assert_array_equal(list(first.eval_batches(256))[1].sparse, world.batch("eval", 1, 256).sparse)


def test_pipeline_yields_the_same_batches_as_the_source():
  cfg = DataConfig()
  train, _ = open_train_eval(cfg)
  it = list(train_iterator(train, batch_size=128, start=5, stop=12, num_threads=3))
  assert len(it) == 7
  for i, b in zip(range(5, 12), it):
    np.testing.assert_array_equal(b.sparse, train.train_batch(i, 128).sparse)
    np.testing.assert_array_equal(b.labels, train.train_batch(i, 128).labels)


@pytest.mark.realdata
def test_examples_source_epochs_and_padding(data_dir):
  ex = readers.read_criteo(str(data_dir / "criteo_kaggle_head1k" / "train.txt"))
  src = ExamplesSource(ex, seed=3)
  seen = np.concatenate([src.train_batch(i, 100).timestamp for i in range(10)])
  assert sorted(seen.tolist()) == sorted(ex.data.timestamp.tolist())  # one epoch = every row once
  assert not np.array_equal(src.train_batch(0, 100).timestamp, src.train_batch(10, 100).timestamp)
  evs = list(src.eval_batches(300))
  assert len(evs) == 4 and evs[-1].weights.sum() == 100 and evs[-1].labels.shape == (300, 1)
  with pytest.raises(ValueError, match="larger than the 1000 training examples"):
    src.train_batch(0, 2048)


@pytest.mark.realdata
def test_criteo_head1k_smoke_trains(tmp_path, data_dir):
  from train import ranker
  wd = tmp_path / "criteo"
  rc = ranker.main(["--workdir", str(wd), "--data.train", f"criteo:{data_dir}/criteo_kaggle_head1k/train.txt@train",
                    "--data.batch_size", "64", "--data.eval_batch_size", "256", "--model.dcnv2.embed_dim", "8",
                    "--model.dcnv2.hash_rows", "4096", "--train.steps", "30", "--train.log_every", "10",
                    "--no-train.progress", "--train.num_devices", "1"])
  assert rc == 0
  import json
  s = json.loads((wd / "summary.json").read_text())
  assert s["steps"] == 30 and np.isfinite(s["eval_ne"]) and 0.0 <= s["eval_auc"] <= 1.0
  assert s["eval"]["click/count"] == 200  # the 20% eval split of 1000 rows
  assert "oracle_ne" not in s  # real data has no true probabilities


def test_bad_data_file_gives_clear_cli_error(tmp_path, capsys):
  from train import ranker
  bad = tmp_path / "bad.libfm"
  bad.write_text("1 3:1 5:1\n0 3:1 x:1\n")
  rc = ranker.main(["--workdir", str(tmp_path / "wd"), "--data.train", f"libfm:{bad}@train", "--train.steps", "1",
                    "--no-train.progress"])
  err = capsys.readouterr().err
  assert rc == 2 and str(bad) in err and ":2:" in err


def test_a_missing_relative_data_file_says_both_places_it_looked(monkeypatch, tmp_path):
  monkeypatch.setenv("JAXREC_DATA_DIR", str(tmp_path))
  with pytest.raises(DataFormatError, match=rf"nonexistent: no such file here \(.*\) or in the real-data folder "
                                            rf"{tmp_path} \(set JAXREC_DATA_DIR to look elsewhere\)"):
    open_train_eval(DataConfig(train="libfm:nonexistent@train"))
