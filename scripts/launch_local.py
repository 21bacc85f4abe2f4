"""Source-checkout wrapper of `gba-launch` (`gba_tf/bin/launch_local.py`).

  python scripts/launch_local.py --flagfile=configs/local_gba.cfg --mode=gba
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gba_tf.bin import launch_local  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  launch_local.run()
