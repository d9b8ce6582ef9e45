"""The compiled serving loop and its HTTP front end (`python -m serve`).

Built so far: `serve.request` (RankRequest, validation into model rows) and `serve.engine`
(load a trained ranker, dynamic batching over ahead-of-time compiled bucket steps). Not built
yet (the serving issue): the HTTP front end, device-resident caches, SOAP user embeddings,
ERCache tiers, hot swap.
"""
