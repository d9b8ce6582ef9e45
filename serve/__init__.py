"""The compiled serving loop and its HTTP front end (`python -m serve`).

- `serve.request`: RankRequest (features, candidates, user_id), validation into model rows with
  errors that name the field (RequestError).
- `serve.engine`: `open_engine(workdir)` loads a trained ranker (and, for a SUM ranker, its user
  model and cache); dynamic batching over ahead-of-time compiled bucket steps (no compilation and
  no implicit host-device transfer on the request path), bounded queue (Overloaded), drain on
  close, hot swap of a newer checkpoint under load (`Engine.reload` / `swap`), `describe`,
  `example_request`, `stats`.
- `serve.user_embedding`: SUM user embeddings on the request path (SOAP): the bucket step reads
  each request's user embedding from the device-resident ERCache (direct tier, failover tier with
  stabilization over the last m embeddings, each with its own TTL and capacity:
  `EngineConfig.user_cache`), a background worker runs the frozen user tower on the request's user
  features and writes fresh embeddings back; responses say which source served (direct,
  failover, fallback). `UserCacheConfig(mode="sync")`: a direct-tier miss runs the tower for the
  request within a deadline instead (fresh), failing over to the failover tier, else the fallback.
- `serve.app`, `serve.registry`, `serve.metrics`, `serve.loadgen`, `python -m serve`: the HTTP
  front end over the engine (see `serve.app`).
- `serve.bench_engine` (`python -m serve.bench_engine`): the engine's throughput without HTTP.
- `serve.replay` (`python -m serve.replay`): request streams (ads world with a SUM ranker, Taobao and
  MovieLens access logs) replayed through ERCache's device tiers: inferences saved, downstream NE
  and staleness vs TTL, SOAP, fallbacks with and without the failover tier (jaxrec.cache.replay_study).
"""
