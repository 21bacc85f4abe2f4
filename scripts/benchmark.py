"""Source-checkout wrapper of `gba-benchmark` (`gba_tf/bin/benchmark.py`).

  python scripts/benchmark.py --quick      # make demo
  python scripts/benchmark.py              # make bench
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gba_tf.bin import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  benchmark.run()
