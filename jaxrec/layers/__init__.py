"""Flax NNX layers: embeddings, Dense (per-GEMM precision), MLP, DCNv2 cross network, multi-task heads."""

from jaxrec.layers.blocknorm import block_norm
from jaxrec.layers.dcn import CrossLayer, CrossNetwork
from jaxrec.layers.dense import Dense, gemm_sites, plain_precision, prequantize_fp8_weights
from jaxrec.layers.embedding import FusedEmbedding, TableConfig, hash_ids, pool, table_configs
from jaxrec.layers.heads import MultiTaskHeads
from jaxrec.layers.mlp import MLP, activation

__all__ = ["block_norm", "CrossLayer", "CrossNetwork", "Dense", "gemm_sites", "plain_precision",
           "prequantize_fp8_weights", "FusedEmbedding", "TableConfig", "hash_ids", "pool", "table_configs", "MultiTaskHeads", "MLP", "activation"]
