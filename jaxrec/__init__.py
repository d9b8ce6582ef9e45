"""jaxrec: a JAX/XLA stack for large recommendation models as they run in ads ranking.

Layers, each importing only from the ones above it:
    jaxrec.data       Batch pytree, schema, synthetic ads world, real-format readers, grain pipelines
    jaxrec.layers     Flax NNX layers: fused row-sharded embedding, MLP, DCNv2 cross, heads
    jaxrec.models     models built from layers (DCNv2 ranker, logistic regression)
    jaxrec.training   train state, sparse row-wise Adagrad, sharded jitted steps, checkpoints, loop
and the utilities jaxrec.metrics, jaxrec.config, jaxrec.plotting, jaxrec.progress.
Entry points: `python -m train.ranker`, `python -m train.bench_dlrm`.
"""
