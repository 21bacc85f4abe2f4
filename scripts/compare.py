"""Source-checkout wrapper of `gba-compare` (`gba_tf/bin/compare.py`).

  python scripts/compare.py --runs=A.json:healthy/sync \
      --against=B.json:healthy/sync
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gba_tf.bin import compare  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  compare.run()
