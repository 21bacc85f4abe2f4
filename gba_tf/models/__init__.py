"""Reference models for examples, tests and benchmarks.

Every model maps int64 ids [batch, num_fields] (one global vocabulary) to
logits [batch, 1], so any of them trains on any dataset in `gba_tf.data`.
"""

from gba_tf.models.dcn import dcn_v2
from gba_tf.models.deepfm import deepfm
from gba_tf.models.embedding_mlp import embedding_mlp

MODELS = {"embedding_mlp": embedding_mlp, "dcn": dcn_v2, "deepfm": deepfm}

__all__ = ["MODELS", "dcn_v2", "deepfm", "embedding_mlp"]
