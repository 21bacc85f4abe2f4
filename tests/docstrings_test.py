"""The `Example:` blocks of the library's docstrings, run as doctests.

A docstring example is a user's first reading of a module; one that no
longer holds misleads. Every module under `gba_tf/` with a `>>>` line is
found (not listed by hand, so a new one is not forgotten) and its examples
run; each must run at least one and fail none.
"""

import doctest
import importlib

from absl.testing import parameterized
import gba_tf  # sets TF_USE_LEGACY_KERAS=1 before TensorFlow loads
import tensorflow as tf

from tests import testing_utils


def _modules_with_examples():
  found = []
  for module_name, path in testing_utils.package_modules():
    with open(path, encoding="utf-8") as f:
      if ">>>" in f.read():
        found.append(module_name)
  return sorted(found)


MODULES = _modules_with_examples()


class DocstringExamplesTest(tf.test.TestCase, parameterized.TestCase):

  def test_modules_are_found(self):
    # The walk itself: these two have examples (a walk that finds nothing
    # would make every case below vanish, not fail).
    self.assertContainsSubset(["gba_tf.schedule", "gba_tf.sim.engine"],
                              MODULES)

  @parameterized.parameters(*MODULES)
  def test_examples_hold(self, module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        report=False, verbose=False)
    self.assertGreater(result.attempted, 0, module_name)
    self.assertEqual(result.failed, 0,
                     f"{module_name}: {result.failed} of {result.attempted} "
                     "docstring examples fail (run doctest on it to see)")


if __name__ == "__main__":
  tf.test.main()
