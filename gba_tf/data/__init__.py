"""Datasets for GBA examples, tests and benchmarks."""

from gba_tf.data.synthetic import SyntheticCTR
from gba_tf.data.synthetic import with_straggler

__all__ = ["SyntheticCTR", "with_straggler"]
