"""Source-checkout wrapper of `gba-train` (`gba_tf/bin/train.py`).

  TF_CONFIG=... python scripts/train.py --flagfile=configs/local_gba.cfg

The resolved config goes to `<model_dir>/config-<mode>.json`, checkpoints to
`<model_dir>/ckpt`, the test AUC to `<model_dir>/result.json`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gba_tf.bin import train  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  train.main()
