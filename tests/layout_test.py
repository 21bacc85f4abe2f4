"""The package's layers depend one way: launch -> switching -> library.

Read from the source (every `import` statement of every module, at any
depth), so a new import that breaks the layering fails here before it makes
a cycle: the library (`gba_tf/*.py`, `gba_tf/data`, `gba_tf/models`) imports
neither `gba_tf.switching` nor `gba_tf.launch`; switching does not import
launch; the simulator (`gba_tf.sim`) stands on the library alone; the pure
modules (the switching decision, the schedule rules, the simulator) import
no TensorFlow.
"""

import ast
import os

import tensorflow as tf

from tests import testing_utils

_PACKAGE = testing_utils.PACKAGE


def imports_of(path):
  """Every module name `path` imports (`from a import b` gives a and a.b)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _layer(module):
  for layer in ("gba_tf.launch", "gba_tf.switching", "gba_tf.bin",
                "gba_tf.sim"):
    if module == layer or module.startswith(layer + "."):
      return layer
  return "gba_tf"  # the library, with its data/ and models/


# What each layer may import from the package.
_ALLOWED = {
    "gba_tf": {"gba_tf"},
    "gba_tf.switching": {"gba_tf", "gba_tf.switching"},
    "gba_tf.launch": {"gba_tf", "gba_tf.switching", "gba_tf.launch"},
    "gba_tf.sim": {"gba_tf", "gba_tf.sim"},
    "gba_tf.bin": {"gba_tf", "gba_tf.switching", "gba_tf.launch",
                   "gba_tf.bin", "gba_tf.sim"},
}


def layering_violations(modules):
  """`module imports name` for each import across the layers' order."""
  bad = []
  for module, path in modules:
    for name in sorted(imports_of(path)):
      if name == "gba_tf" or name.startswith("gba_tf."):
        if _layer(name) not in _ALLOWED[_layer(module)]:
          bad.append(f"{module} imports {name}")
  return bad


class LayoutTest(tf.test.TestCase):

  def test_layers_depend_one_way(self):
    modules = list(testing_utils.package_modules())
    # The walk finds the three layers (an empty walk would pass vacuously).
    self.assertContainsSubset(
        {"gba_tf.strategy", "gba_tf.switching.monitor",
         "gba_tf.launch.job", "gba_tf.bin.train", "gba_tf.sim.engine"},
        {m for m, _ in modules})
    self.assertEqual(layering_violations(modules), [])

  def test_a_library_module_importing_launch_is_caught(self):
    # The check itself can fail: a library module with a launch import.
    path = os.path.join(self.get_temp_dir(), "strategy.py")
    with open(path, "w") as f:
      f.write("def f():\n  from gba_tf.launch import tasks\n")
    self.assertEqual(layering_violations([("gba_tf.strategy", path)]),
                     ["gba_tf.strategy imports gba_tf.launch",
                      "gba_tf.strategy imports gba_tf.launch.tasks"])

  def test_pure_switching_modules_import_no_tensorflow(self):
    # The monitor and the decision are shared with anything that is not a
    # TF process (a controller): no TensorFlow, no numpy.
    for name in ("monitor", "decision"):
      path = os.path.join(_PACKAGE, "switching", f"{name}.py")
      heavy = {n for n in imports_of(path)
               if n.split(".")[0] in ("tensorflow", "tf_keras", "numpy")}
      self.assertEqual(heavy, set(), name)

  def test_policy_rules_and_the_simulator_import_no_tensorflow(self):
    # The rules the runtime and the simulator share are numpy; the
    # simulator runs them without building one TF op.
    paths = [os.path.join(_PACKAGE, name) for name in
             ("schedule.py", "staleness.py", "config.py", "stragglers.py",
              "push_trace.py")]
    paths += [os.path.join(_PACKAGE, "sim", name) for name in
              ("engine.py", "timing.py", "accuracy.py", "calibration.py")]
    for path in paths:
      heavy = {n for n in imports_of(path)
               if n.split(".")[0] in ("tensorflow", "tf_keras")}
      self.assertEqual(heavy, set(), path)
    # The runtime reads its rules from the same module.
    self.assertIn("gba_tf.schedule", imports_of(
        os.path.join(_PACKAGE, "accumulator.py")))


if __name__ == "__main__":
  tf.test.main()
