"""Readers of the real dataset formats; each returns `Examples` (or a raw event log) and raises
`DataFormatError` naming the file, line and field of any bad input."""

from jaxrec.data.readers.aliccp import align_aliccp_domains, read_aliccp, read_aliexpress
from jaxrec.data.readers.criteo import criteo_schema, read_criteo, read_criteo_csv
from jaxrec.data.readers.libfm import FRAPPE_FIELDS, read_libfm
from jaxrec.data.readers.movielens import read_movielens
from jaxrec.data.readers.taobao import (TaobaoEvents, pv_to_buy_delays, read_taobao_events, taobao_examples,
                                        taobao_time_split)

__all__ = [
    "FRAPPE_FIELDS",
    "TaobaoEvents",
    "align_aliccp_domains",
    "criteo_schema",
    "pv_to_buy_delays",
    "read_aliccp",
    "read_aliexpress",
    "read_criteo",
    "read_criteo_csv",
    "read_libfm",
    "read_movielens",
    "read_taobao_events",
    "taobao_examples",
    "taobao_time_split",
]
