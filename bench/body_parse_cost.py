"""Event-loop cost of a /v1/rank body: pydantic's parse (serve.app.RankBody.model_validate_json) and
the JSON object / value pre-count serve.app refuses oversized bodies with, on the default ads-world
ranker schema and EngineConfig.max_candidates. CPU only; prints one line per body.

    python bench/body_parse_cost.py
"""

import json
import time
import tracemalloc

from jaxrec.data.adsworld import AdsWorld, AdsWorldConfig
from serve.app import RankBody
from serve.engine import EngineConfig
from serve.request import RequestEncoder, json_counts


def tiny(n: int) -> bytes:
  return b'{"model":"m","candidates":[' + b",".join([b'{"item_id":0}'] * n) + b"]}"


def nested(n: int) -> bytes:
  return b'{"model":"m","features":{"ad_id":[' + b",".join([b"[]"] * n) + b']},"candidates":[{"item_id":0}]}'


def main() -> None:
  schema = AdsWorld(AdsWorldConfig()).schema
  mc = EngineConfig().max_candidates
  enc = RequestEncoder(schema, mc)
  max_objects, max_values = enc.max_json_objects(), enc.max_json_values()
  feats = {**{n: 0.123456 for n in schema.dense}, **{f.name: [1] * f.max_len for f in schema.sparse}}
  maximal = json.dumps({"model": "m", "features": feats,
                        "candidates": [{"item_id": i, "features": feats} for i in range(mc)]}).encode()
  n_2mib = (2 << 20) // 14
  bodies = {"largest valid: max_candidates x every feature": maximal,
            f"{n_2mib:,} tiny candidates (2 MiB)": tiny(n_2mib),
            f"{max_objects - 2:,} tiny candidates (object limit)": tiny(max_objects - 2),
            f"{(max_values - 8) // 2:,} nested arrays (value limit)": nested((max_values - 8) // 2)}
  print(f"max_candidates {mc}, features {len(schema.dense) + len(schema.sparse)}: max_json_objects {max_objects:,}, "
        f"max_json_values {max_values:,}")
  for name, b in bodies.items():
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      RankBody.model_validate_json(b)
      times.append(time.perf_counter() - t0)
    tracemalloc.start()
    parsed = RankBody.model_validate_json(b)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del parsed
    t0 = time.perf_counter()
    for _ in range(20):
      objects, values = json_counts(b)
    count_ms = (time.perf_counter() - t0) / 20 * 1e3
    verdict = "refused (413) before parsing" if objects > max_objects or values > max_values else "parsed"
    print(f"{name:<48} {len(b) / 1024:7.0f} KiB  objects {objects:>7,}  values {values:>8,}  "
          f"parse {min(times) * 1e3:6.1f} ms  heap {peak / 2**20:5.1f} MiB  count {count_ms:4.2f} ms  {verdict}")


if __name__ == "__main__":
  main()
