"""Recent-history features and the frozen user-embedding source (SUM's downstream side)."""

import dataclasses
import doctest
import json

import jax
import numpy as np
import pytest

from jaxrec.data.adsworld import AdsWorld, AdsWorldConfig
from jaxrec.data.errors import DataSpecError
from jaxrec.data.pipeline import ExamplesSource
from jaxrec.data import domain_stream, user_history as user_history_module
from jaxrec.data.sources import DataConfig, _world, open_train_eval
from jaxrec.data.user_embedding import UserEmbeddingSource
from jaxrec.data.user_history import HistoryConfig, UserHistory, add_history, user_history
from jaxrec.models import DCNv2Config, ModelConfig
from jaxrec.training.loop import LoopConfig, RankerConfig, train_and_evaluate
from jaxrec.training import domain_eval
from jaxrec.training.state import merge_model
from jaxrec.models.user_tower import UserTowerConfig
from jaxrec.training.user_model import UserDataConfig, UserModelConfig, UserModelError, load_user_model, \
    train_user_model

SMALL = AdsWorldConfig.small()
HIST = HistoryConfig(bucket_s=1800.0, max_clicks=4, half_life_days=0.5)


# ----- history ----------------------------------------------------------------------------------


def _brute_force(world: AdsWorld, stream: str, cutoff_s: float, cfg: HistoryConfig):
  """Every user's last H clicked ads and decayed counts from all requests before `cutoff_s`."""
  req = world.requests(stream, 0.0, cutoff_s)
  K = world.cfg.candidates_per_request
  _, ex = world.examples(stream, 0, (int(req.request_id[-1]) + 1) * K)
  U, H = world.cfg.num_users, cfg.max_clicks
  ads = np.full((U, H), -1)
  for u in range(U):
    clicked = ex["ad_id"][(ex["user_id"] == u) & ex["click"]][-H:]  # examples are in time order
    if clicked.size:
      ads[u, H - clicked.size:] = clicked
  b = int(cutoff_s // cfg.bucket_s)
  age = b - 1 - np.floor(ex["timestamp_s"] / cfg.bucket_s)  # whole buckets since the example's bucket
  w = 0.5 ** (age * cfg.bucket_s / (cfg.half_life_days * 86400.0))
  counts = np.stack([np.bincount(ex["user_id"], weights=w, minlength=U),
                     np.bincount(ex["user_id"], weights=w * ex["click"], minlength=U)], 1)
  return ads, counts


def test_history_is_the_last_clicks_before_the_bucket():
  world = AdsWorld(SMALL)
  hist = UserHistory(world, "train", HIST)
  b = 13
  snap = hist.snapshot(b)
  ads, counts = _brute_force(world, "train", b * HIST.bucket_s, HIST)
  np.testing.assert_array_equal(snap.ads, ads)
  np.testing.assert_allclose(snap.counts, counts, rtol=1e-4)
  assert (snap.ads[:, -1] >= 0).mean() > 0.3  # most active users have clicked by then
  # a row's history is its bucket's snapshot: nothing from its own request or later
  batch, extras = world.batch_with_extras("train", 30, 256)
  got_ads, _ = hist.lookup(extras["user_id"], extras["timestamp_s"])
  for i in range(0, 256, 37):
    cutoff = np.floor(extras["timestamp_s"][i] / HIST.bucket_s) * HIST.bucket_s
    assert cutoff <= extras["timestamp_s"][i]
    want, _ = _brute_force(world, "train", cutoff, HIST) if cutoff > 0 else (np.full((SMALL.num_users, 4), -1), 0)
    np.testing.assert_array_equal(got_ads[i], want[extras["user_id"][i]])


def test_add_history_layout():
  world = AdsWorld(SMALL)
  hist = user_history(world, "train", HIST)
  base = world.batch("train", 50, 128)
  b = add_history(base, world, hist)
  assert b.sparse.shape == (128, 12, 4) and b.dense.shape == (128, base.dense.shape[1] + 3)
  np.testing.assert_array_equal(b.sparse[:, :9, 0], base.sparse[:, :, 0])
  assert not b.sparse_mask[:, :9, 1:].any()  # one-id features are padded, masked
  ads, adv, cat = b.sparse[:, 9], b.sparse[:, 10], b.sparse[:, 11]
  m = b.sparse_mask[:, 9]
  np.testing.assert_array_equal(adv[m], world.entities.ad_advertiser[ads[m]])
  np.testing.assert_array_equal(cat[m], world.entities.ad_category[ads[m]])
  assert np.all(np.isfinite(b.dense)) and user_history(world, "train", HIST) is hist  # shared per stream


def test_history_features_keep_ad_zero():
  """Ad id 0 is a real ad: only -1 marks an empty history slot (ad 0 is masked in, with its advertiser
  and category), and the dense counts are log1p and the smoothed click-rate logit."""
  world = AdsWorld(SMALL)

  class Fixed:  # a UserHistory stand-in: one row whose clicked ads include ad 0
    def lookup(self, user_id, timestamp_s):
      return np.array([[-1, 0, 5, 0]]), np.array([[9.0, 2.0]], np.float32)

  sparse, mask, dense = user_history_module.history_features(world, Fixed(), np.array([0]), np.array([0.0]))
  ent = world.entities
  np.testing.assert_array_equal(mask[0], [[False, True, True, True]] * 3)
  np.testing.assert_array_equal(sparse[0, 0], [0, 0, 5, 0])
  np.testing.assert_array_equal(sparse[0, 1], [0, ent.ad_advertiser[0], ent.ad_advertiser[5], ent.ad_advertiser[0]])
  np.testing.assert_array_equal(sparse[0, 2], [0, ent.ad_category[0], ent.ad_category[5], ent.ad_category[0]])
  np.testing.assert_allclose(dense[0], [np.log(10.0), np.log(3.0), np.log(3.0 / 16.0)], rtol=1e-6)


# ----- the frozen tower as a feature source -----------------------------------------------------------


TOWER = UserModelConfig(
    data=UserDataConfig(batch_size=128, eval_batch_size=512, eval_examples=1024, world=SMALL, history=HIST),
    model=UserTowerConfig(embed_dim=8, user_mlp=(16,), emb_dim=8, num_embeddings=2, mix_mlp=(16,)),
    train=LoopConfig(steps=6, log_every=3, checkpoint_every=6, num_devices=1, progress=False))


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("user_model")
  train_user_model(TOWER, wd)
  return wd


def _data(tower_dir, **kw) -> DataConfig:
  return DataConfig(batch_size=128, eval_batch_size=512, eval_examples=1024, world=SMALL, user_model=str(tower_dir),
                    **kw)


def test_source_appends_each_rows_embedding(tower_dir):
  train, evl = open_train_eval(_data(tower_dir))
  assert isinstance(train, UserEmbeddingSource) and isinstance(evl, UserEmbeddingSource)
  base_schema = _world(SMALL).schema
  assert train.schema.dense == base_schema.dense + tuple(f"user_emb_{i}" for i in range(16))
  assert evl.schema == train.schema
  tower = load_user_model(tower_dir)
  world = _world(SMALL)
  for src, stream, batch in ((train, "train", train.train_batch(20, 128)),
                             (evl, "eval", next(iter(evl.eval_batches(512))))):
    base = (world.batch(stream, 20, 128) if stream == "train" else next(iter(src.base.eval_batches(512))))
    nb = base.dense.shape[1]
    np.testing.assert_array_equal(batch.dense[:, :nb], base.dense)
    np.testing.assert_array_equal(batch.sparse, base.sparse)
    np.testing.assert_array_equal(batch.labels, base.labels)
    # against a direct forward of the restored tower on the rows' users, times and history
    model = merge_model(tower.graphdef, tower.params, tower.table)
    raw = np.asarray(model.user_embedding(add_history(base, world, user_history(world, stream, HIST))))
    np.testing.assert_allclose(batch.dense[:, nb:], (raw - tower.mean) / tower.std, rtol=1e-5, atol=1e-5)
    # and from nothing but (user, time): the same numbers
    user = base.sparse[:, 0, 0]
    np.testing.assert_allclose(tower.embed_users(user, base.timestamp, world, stream), batch.dense[:, nb:],
                               rtol=1e-5, atol=1e-5)
  # rows of one user at one bucket share an embedding; different users differ
  emb = train.train_batch(20, 128).dense[:, nb:]
  users = train.train_batch(20, 128).sparse[:, 0, 0]
  assert len(np.unique(users)) > 1 and len(np.unique(emb.round(5), axis=0)) > 1
  stats = json.loads((tower_dir / "embedding_stats.json").read_text())
  assert len(stats["mean"]) == 16 and min(stats["std"]) > 0


def test_downstream_training_leaves_the_tower_frozen(tower_dir, tmp_path):
  before = load_user_model(tower_dir)
  params_before = jax.tree.map(np.array, (before.params, before.table))
  train, _ = open_train_eval(_data(tower_dir))
  in_use = jax.tree.map(np.array, (train.tower.params, train.tower.table))
  cfg = RankerConfig(data=_data(tower_dir),
                     model=ModelConfig(dcnv2=DCNv2Config(embed_dim=4, bottom_mlp=(8,), top_mlp=(8,))),
                     train=LoopConfig(steps=6, log_every=3, checkpoint_every=6, num_devices=1, progress=False))
  summary = train_and_evaluate(cfg, tmp_path / "ranker")
  assert np.isfinite(summary["eval_ne"])
  schema = json.loads((tmp_path / "ranker" / "schema.json").read_text())
  assert schema["dense"][-1] == "user_emb_15"
  for _ in range(3):  # pulling batches only reads the tower
    train.train_batch(3, 128)
  after = load_user_model(tower_dir)
  for a, b in ((params_before, jax.tree.map(np.array, (after.params, after.table))),
               (in_use, jax.tree.map(np.array, (train.tower.params, train.tower.table)))):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_resumed_ranker_keeps_the_user_model_step_it_started_on(tower_dir, tmp_path, capsys):
  """A user model trained on while a ranker that consumes it was stopped: the resumed ranker used
  to switch to the newest user-model step halfway (its second half trained and evaluated on other
  embeddings, silently). It keeps its first start's step, and is refused once that step is gone."""
  import shutil
  from jaxrec.training.loop import WorkdirConflictError
  tower = tmp_path / "tower"
  shutil.copytree(tower_dir, tower)

  def ranker_cfg(steps):
    return RankerConfig(data=_data(tower), model=ModelConfig(dcnv2=DCNv2Config(embed_dim=4, bottom_mlp=(8,),
                                                                               top_mlp=(8,))),
                        train=LoopConfig(steps=steps, log_every=3, checkpoint_every=3, num_devices=1, progress=False))

  whole = train_and_evaluate(ranker_cfg(6), tmp_path / "whole")  # on the tower's step 6 throughout
  train_and_evaluate(ranker_cfg(3), tmp_path / "resumed")
  assert json.loads((tmp_path / "resumed" / "user_model_step.json").read_text())["step"] == 6
  train_user_model(dataclasses.replace(TOWER, train=dataclasses.replace(TOWER.train, steps=12)), tower)
  assert load_user_model(tower).step == 12
  capsys.readouterr()
  resumed = train_and_evaluate(ranker_cfg(6), tmp_path / "resumed")
  err = capsys.readouterr().err
  assert "training on user model" in err and "step 6, the one this run started on, not its newest step 12" in err
  assert resumed["eval_ne"] == whole["eval_ne"]  # the same embeddings: the same model
  shutil.rmtree(tower / "checkpoints" / "6")
  with pytest.raises(WorkdirConflictError, match="checkpoint at step 6, which it no longer holds"):
    train_and_evaluate(ranker_cfg(9), tmp_path / "resumed")


def test_bad_user_model_workdirs_are_clear(tower_dir, tmp_path):
  with pytest.raises(UserModelError, match="no such directory"):
    load_user_model(tmp_path / "missing")
  ranker_dir = tmp_path / "ranker"
  ranker_dir.mkdir()
  (ranker_dir / "config.json").write_text("{}")
  with pytest.raises(UserModelError, match="not a user-model workdir.*ranker's workdir"):
    load_user_model(ranker_dir)
  half = tmp_path / "half"
  half.mkdir()
  for name in ("user_model.json", "schema.json", "table.json"):
    (half / name).write_text((tower_dir / name).read_text())
  with pytest.raises(UserModelError, match="no checkpoint yet"):
    load_user_model(half)
  assert not (half / "checkpoints").exists()  # loading never writes into the workdir
  assert issubclass(UserModelError, DataSpecError)  # so `python -m train.ranker` reports it in one line
  with pytest.raises(UserModelError, match="another ads world.*num_users"):
    open_train_eval(dataclasses.replace(_data(tower_dir), world=dataclasses.replace(SMALL, num_users=400)))
  # the tower trained on "train": a ranker evaluated there would score rows the embeddings learned from
  with pytest.raises(UserModelError, match="trained on the ads world's 'train' stream, the ranker's eval data"):
    open_train_eval(_data(tower_dir, train="adsworld:eval2", eval="adsworld:train"))
  tower = load_user_model(tower_dir)
  with pytest.raises(UserModelError, match="need the ads world"):
    UserEmbeddingSource(ExamplesSource.__new__(ExamplesSource), tower)


def test_ranker_entrypoint_reports_a_bad_user_model(tmp_path, capsys):
  from train import ranker
  rc = ranker.main(["--workdir", str(tmp_path / "r"), "--data.user_model", str(tmp_path / "nope"),
                    "--train.steps", "2", "--no-train.progress"])
  assert rc == 2
  assert "no such directory" in capsys.readouterr().err


@pytest.mark.parametrize("module", [user_history_module, domain_stream, domain_eval])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_domain_stream_is_the_full_streams_rows_of_one_domain():
  world = _world(SMALL)
  src = domain_stream.DomainStreamSource(world, "train", 3, eval_examples=0)
  full, extras = world.examples("train", 0, 60_000)
  rows = extras["domain"] == 3
  got = src.examples(5, 5 + 700)
  for field in ("sparse", "dense", "labels", "true_prob", "timestamp"):
    np.testing.assert_array_equal(getattr(got, field), getattr(full, field)[rows][5:705], err_msg=field)
  assert src.num_examples_before(float(extras["timestamp_s"][-1]) + 1e-3) == rows.sum()


def test_domain_stream_eval_pads_its_last_batch():
  """The eval stream holds exactly eval_examples rows of the domain: the last batch is padded with rows of
  weight 0, not filled with the domain's next examples."""
  src = domain_stream.DomainStreamSource(_world(SMALL), "train", 3, eval_examples=100)
  got = list(src.eval_batches(64))
  assert len(got) == 2 and all(b.labels.shape == (64, 2) for b in got)
  np.testing.assert_array_equal(np.concatenate([b.weights for b in got]), [1.0] * 100 + [0.0] * 28)
  want = src.examples(0, 100)
  np.testing.assert_array_equal(np.concatenate([b.sparse for b in got])[:100], want.sparse)
  np.testing.assert_array_equal(np.concatenate([b.labels for b in got])[:100], want.labels)
