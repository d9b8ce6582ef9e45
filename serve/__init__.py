"""The compiled serving loop and its HTTP front end (`python -m serve`).

Not built yet: it is the subject of the serving issue (dynamic batching, device-resident
embedding tables and caches, SOAP user embeddings, ERCache tiers).
"""
