"""Device-resident caches: an open-addressing hash table with TTL and eviction (`hash_table`),
ERCache's direct and failover tiers of user embeddings (`ercache`: `ercache.lookup`, ...), and
SOAP's asynchronous refresh of them (`soap.SoapCache`)."""

from jaxrec.cache import ercache, soap
from jaxrec.cache.ercache import COUNTERS, ERCacheConfig, ERCacheState, Served, Source, read_counters
from jaxrec.cache.hash_table import HashTable, insert, lookup, probe, ring_mean, split_keys
from jaxrec.cache.soap import SoapCache, SoapConfig

__all__ = ["COUNTERS", "ERCacheConfig", "ERCacheState", "HashTable", "Served", "SoapCache", "SoapConfig",
           "Source", "ercache", "insert", "lookup", "probe", "read_counters", "ring_mean", "soap",
           "split_keys"]
