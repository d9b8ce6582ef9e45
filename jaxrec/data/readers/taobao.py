"""Taobao UserBehavior (Tianchi 649): `user_id,item_id,category_id,behavior_type,timestamp`, no header.

`read_taobao_events` gives the raw event log; `taobao_examples` turns its pv (click) events into a
two-task funnel dataset; `pv_to_buy_delays` measures click-to-conversion delays.

Timestamps are Unix seconds; the official window is 2017-11-25 00:00:00 to 2017-12-03 23:59:59
Beijing time (UTC+8). Events outside it are known noise and are dropped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxrec.data.batch import Schema, SparseFeature
from jaxrec.data.errors import DataFormatError
from jaxrec.data.examples import Examples
from jaxrec.data.readers._common import one_hot_batch, read_lines, to_index

BEHAVIORS = ("pv", "cart", "fav", "buy")  # behavior code = index: pv=0, cart=1, fav=2, buy=3
PV, CART, FAV, BUY = range(4)
WINDOW_START = 1511539200  # 2017-11-25 00:00:00 UTC+8
WINDOW_END = 1512316799  # 2017-12-03 23:59:59 UTC+8 (inclusive)
BEIJING_OFFSET_S = 8 * 3600

_COLS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
_CODE = {b: i for i, b in enumerate(BEHAVIORS)}


@dataclasses.dataclass(frozen=True)
class TaobaoEvents:
  """An event log, sorted stably by (user_id, timestamp). All arrays [E], raw ids from the file.

  behavior: int8 code, BEHAVIORS[code]. timestamp: Unix seconds (int64).
  num_outside_window: rows of the file dropped because they fall outside the official window.
  """

  user_id: np.ndarray
  item_id: np.ndarray
  category_id: np.ndarray
  behavior: np.ndarray
  timestamp: np.ndarray
  num_outside_window: int = 0
  source: str = ""

  def __len__(self) -> int:
    return int(self.user_id.shape[0])


def read_taobao_events(path: str | Path) -> TaobaoEvents:
  """Parses UserBehavior.csv, drops events outside the official window and sorts by (user, time)."""
  lines = read_lines(path)
  n = len(lines)
  cols = np.empty((n, 4), np.int64)  # user, item, category, timestamp
  behavior = np.empty(n, np.int8)
  for i, text in enumerate(lines):
    parts = text.split(",")
    if len(parts) != len(_COLS):
      field = _COLS[len(parts)] if len(parts) < len(_COLS) else None
      raise DataFormatError(str(path), i + 1, field, f"expected {len(_COLS)} columns, got {len(parts)}")
    code = _CODE.get(parts[3].strip())
    if code is None:
      raise DataFormatError(str(path), i + 1, "behavior_type", f"expected one of {BEHAVIORS}, got {parts[3]!r}")
    behavior[i] = code
    try:
      cols[i] = (int(parts[0]), int(parts[1]), int(parts[2]), int(parts[4]))
    except (ValueError, OverflowError):
      for j, name in ((0, "user_id"), (1, "item_id"), (2, "category_id"), (4, "timestamp")):
        to_index(parts[j], path, i + 1, name)
      raise DataFormatError(str(path), i + 1, None, "value outside int64") from None
  neg = cols < 0
  if neg.any():
    r, j = np.unravel_index(int(np.argmax(neg)), neg.shape)
    name = ("user_id", "item_id", "category_id", "timestamp")[j]
    raise DataFormatError(str(path), int(r) + 1, name, f"negative value {int(cols[r, j])}")
  big = cols[:, :3] > np.iinfo(np.int32).max
  if big.any():
    r, j = np.unravel_index(int(np.argmax(big)), big.shape)
    raise DataFormatError(str(path), int(r) + 1, ("user_id", "item_id", "category_id")[j],
                          f"id {int(cols[r, j])} outside [0, 2**31)")
  keep = (cols[:, 3] >= WINDOW_START) & (cols[:, 3] <= WINDOW_END)
  cols, behavior = cols[keep], behavior[keep]
  if cols.shape[0] == 0:
    raise DataFormatError(str(path), None, "timestamp", "no events inside the official window")
  order = np.lexsort((cols[:, 3], cols[:, 0]))  # stable: equal (user, time) keep file order
  cols, behavior = cols[order], behavior[order]
  return TaobaoEvents(user_id=cols[:, 0], item_id=cols[:, 1], category_id=cols[:, 2], behavior=behavior,
                      timestamp=cols[:, 3], num_outside_window=int(n - keep.sum()), source=str(path))


def _pair_ids(events: TaobaoEvents) -> tuple[np.ndarray, int]:
  """A dense id [E] for each event's (user, item) pair, and the number of pairs."""
  pairs = np.stack([events.user_id, events.item_id], axis=1)
  _, inverse = np.unique(pairs, axis=0, return_inverse=True)
  inverse = inverse.reshape(-1)
  return inverse, int(inverse.max()) + 1 if inverse.size else 0


def _last_time(pair: np.ndarray, num_pairs: int, ts: np.ndarray, select: np.ndarray) -> np.ndarray:
  """Per pair [P]: the latest timestamp of the selected events, -1 where there is none."""
  out = np.full(num_pairs, -1, np.int64)
  np.maximum.at(out, pair[select], ts[select])
  return out


def taobao_examples(events: TaobaoEvents) -> Examples:
  """One example per pv event, labelled by what the same user did to the same item afterwards.

  labels ("cart_or_fav", "buy"): 1 if the user carted or faved (resp. bought) the item at or after
  this pv's timestamp, else 0. Ids are the file's raw ids, hashed by the model (vocab_size None,
  as Criteo's), so that every file of one log (a time split into two files, say) agrees on them:

  Schema:
      dense   ()
      sparse  user_id, item_id, category_id (raw ids, vocab_size None: hashed),
              hour (Beijing hour of the pv, vocab 24); max_len 1
      labels  ("cart_or_fav", "buy")
      domain 0, timestamp = the pv's Unix time, weight 1. Rows keep the (user, time) order.
  """
  if len(events) == 0:
    raise DataFormatError(events.source or "taobao events", None, None, "no events")
  ts = events.timestamp.astype(np.int64)
  pair, num_pairs = _pair_ids(events)
  b = events.behavior
  last_cf = _last_time(pair, num_pairs, ts, (b == CART) | (b == FAV))
  last_buy = _last_time(pair, num_pairs, ts, b == BUY)
  pv = np.flatnonzero(b == PV)
  labels = np.stack([ts[pv] <= last_cf[pair[pv]], ts[pv] <= last_buy[pair[pv]]], axis=1)

  columns, features = [], []
  for name in ("user_id", "item_id", "category_id"):
    columns.append(getattr(events, name)[pv])
    features.append(SparseFeature(name, None))
  columns.append(((ts[pv] + BEIJING_OFFSET_S) // 3600) % 24)
  features.append(SparseFeature("hour", 24))

  schema = Schema(dense=(), sparse=tuple(features), labels=("cart_or_fav", "buy"))
  data = one_hot_batch(dense=np.zeros((pv.size, 0), np.float32), ids=np.stack(columns, axis=1), mask=None,
                       labels=labels, timestamp=ts[pv])
  return Examples(schema, data, events.source)


def taobao_time_split(events: TaobaoEvents, eval_fraction: float = 0.2) -> tuple[Examples, Examples]:
  """(train, eval) examples split by time: eval is the latest `eval_fraction` of the views, from the
  boundary time T on, labelled with the whole log; train is the views before T, labelled with the
  events before T only (what was known when training ended: a cart or buy at or after T is not yet
  in a training label). Labelling training views with the whole log would let the eval period's
  outcomes into training (the same later buy labels a training view and an eval view of the item).
  DataSpecError as `Examples.time_split`."""
  full = taobao_examples(events)
  _, evl = full.time_split(eval_fraction)
  boundary = int(evl.data.timestamp.min())
  evl = full.take(np.flatnonzero(full.data.timestamp >= boundary))  # every view of the boundary second
  before = events.timestamp < boundary
  past = dataclasses.replace(events, **{f: getattr(events, f)[before] for f in
                                        ("user_id", "item_id", "category_id", "behavior", "timestamp")})
  return taobao_examples(past), evl


def pv_to_buy_delays(events: TaobaoEvents) -> np.ndarray:
  """Seconds from the first pv of the same (user, item) to each buy that has one before it.

  Returns int64 [K], in the order of the buys in `events`; buys with no earlier (or same-second)
  pv of the item are left out. On the README's Taobao head: K = 921 of 1,750 buys, median ~44 min.
  """
  ts = events.timestamp.astype(np.int64)
  pair, num_pairs = _pair_ids(events)
  first_pv = np.full(num_pairs, np.iinfo(np.int64).max, np.int64)
  is_pv = events.behavior == PV
  np.minimum.at(first_pv, pair[is_pv], ts[is_pv])
  buy = np.flatnonzero(events.behavior == BUY)
  start = first_pv[pair[buy]]
  has = start <= ts[buy]
  return ts[buy][has] - start[has]
