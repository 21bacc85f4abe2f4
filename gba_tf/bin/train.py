"""`gba-train`: one task of a GBA / sync / async job; TF_CONFIG gives its role.

  gba-train --flagfile=configs/local_gba.cfg --mode=gba   # with TF_CONFIG set
  python -m gba_tf.bin.train ...                          # the same

Flags: `gba_tf.launch.flags.define_flags()`. The chief writes the resolved config
to `<model_dir>/config-<mode>.json`, checkpoints to `<model_dir>/ckpt` and
the test AUC to `<model_dir>/result.json`.
"""

from absl import app

import gba_tf  # pylint: disable=unused-import  (TF_USE_LEGACY_KERAS first)
from gba_tf.launch import flags as gba_flags
from gba_tf.launch import job


def main() -> None:
  gba_flags.define_flags()
  app.run(job.main)


if __name__ == "__main__":
  main()
