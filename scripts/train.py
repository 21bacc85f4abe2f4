"""The gba_tf training binary: every task of every mode runs this program.

TF_CONFIG gives the task's role; flags (or a flagfile from `configs/`) give
the job. On one machine, `scripts/launch_local.py` starts every task:

  python scripts/launch_local.py --flagfile=configs/local_gba.cfg
  python scripts/launch_local.py --flagfile=configs/local_gba.cfg --mode=sync
  python scripts/launch_local.py --flagfile=configs/local_gba.cfg \\
      --mode=auto --straggler=1:4 --straggler_seconds=60

In a real cluster (Kubernetes, see `configs/k8s/`) each task runs

  TF_CONFIG='{"cluster": {...}, "task": {"type": "worker", "index": 0}}' \\
      python scripts/train.py --flagfile=configs/local_gba.cfg --model_dir=...

The resolved config goes to `<model_dir>/config-<mode>.json`, checkpoints to
`<model_dir>/ckpt`, the test AUC to `<model_dir>/result.json`.
"""

import os
import sys

from absl import app

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gba_tf  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
from gba_tf import flags as gba_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf import job  # pylint: disable=g-import-not-at-top,wrong-import-position


if __name__ == "__main__":
  gba_flags.define_flags()
  app.run(job.main)
