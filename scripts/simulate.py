"""Source-checkout wrapper of `gba-simulate` (`gba_tf/bin/simulate.py`).

  python scripts/simulate.py                  # the README's sweep
  python scripts/simulate.py --workers=1000 --modes=gba
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gba_tf.bin import simulate  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  simulate.run()
