"""Reference models for examples, tests and benchmarks."""

from gba_tf.models.embedding_mlp import embedding_mlp

__all__ = ["embedding_mlp"]
