"""Device-resident caches: an open-addressing hash table with TTL and eviction (so far)."""

from jaxrec.cache.hash_table import HashTable, insert, lookup, split_keys

__all__ = ["HashTable", "insert", "lookup", "split_keys"]
