"""Command-line flags shared by the gba_tf binaries in `scripts/`.

Importing this module defines nothing; a binary calls `define_flags()` and
then `app.run(main)`. Every flag is optional; a binary may change defaults
with `flags.FLAGS.set_default`.
"""

from absl import flags

from gba_tf import config as config_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the cluster, batch and straggler flags."""
  flags.DEFINE_integer("workers", 4, "Worker processes of the local cluster.")
  flags.DEFINE_integer("ps", 2, "Parameter server processes.")
  flags.DEFINE_integer("local_batch_size", 256, "Samples per local step.")
  flags.DEFINE_integer(
      "global_batch_size", None,
      "Samples per optimizer step (the synchronous global batch); default "
      "workers * local_batch_size.")
  flags.DEFINE_float(
      "step_ms", 0.0,
      "Emulated compute per local step (a sleep in the input pipeline), so "
      "that a 2-core machine can host many workers; 0 for none.")
  flags.DEFINE_integer("straggler", -1, "Index of a slow worker; -1 none.")
  flags.DEFINE_float("slowdown", 4.0,
                     "The straggler takes this many times step_ms.")


def gba_config_from_flags() -> config_lib.GBAConfig:
  global_batch = FLAGS.global_batch_size or (
      FLAGS.workers * FLAGS.local_batch_size)
  return config_lib.GBAConfig(global_batch_size=global_batch,
                              local_batch_size=FLAGS.local_batch_size)
