"""gba_tf: Global Batch gradients Aggregation for TensorFlow (arXiv 2205.11048).

Three layers, dependencies one way (launch -> switching -> library):

* `gba_tf`: the library a user imports: `GBAStrategy`, `GBAConfig`, the
  staleness policy, tokens, accumulators, counters, checkpoints, callbacks,
  export. It imports neither layer below.
* `gba_tf.switching`: the health monitor and the sync <-> GBA decision, and
  their Keras glue.
* `gba_tf.launch`: TF_CONFIG and task start-up, flags, the training job, the
  local launcher and local clusters. `gba_tf.bin` holds the console entry
  points over it (`gba-train`, `gba-launch`, `gba-benchmark`).

Importing the package sets `TF_USE_LEGACY_KERAS=1` before TensorFlow is first
imported, because tensorflow-recommenders (and `tf.keras` in these docs) need
tf_keras rather than Keras 3. Import `gba_tf` before `tensorflow`.
"""

import os as _os

_os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf import applier
from gba_tf import callbacks
from gba_tf import checkpoints
from gba_tf import export
from gba_tf import staleness
from gba_tf import stall
from gba_tf.config import GBAConfig
from gba_tf.staleness import StalenessPolicy
from gba_tf.strategy import GBAStrategy

__all__ = ["GBAConfig", "GBAStrategy", "StalenessPolicy", "callbacks",
           "checkpoints", "export", "staleness", "stall"]
__version__ = "0.1.0"
