"""Command-line flags shared by the gba_tf binaries (`gba-train`, `gba-launch`,
`gba-benchmark`, `scripts/`).

Importing this module defines nothing; a binary calls `define_flags()` and
then `app.run(main)`; `job_config.config_from_flags` resolves them. Every flag is optional; a binary may change defaults
with `flags.FLAGS.set_default`. Flagfiles in `configs/` set them in bulk:

  gba-train --flagfile=configs/local_gba.cfg --mode=sync
"""

from typing import Dict

from absl import flags

from gba_tf import config
from gba_tf import staleness
from gba_tf import stragglers

FLAGS = flags.FLAGS

MODES = ("gba", "sync", "async", "auto")


def define_flags() -> None:
  """Defines the cluster, batch, training, straggler and switching flags."""
  # Cluster and batch.
  flags.DEFINE_enum(
      "mode", "gba", MODES,
      "gba: Global Batch gradients Aggregation over parameter servers. "
      "sync: MultiWorkerMirroredStrategy all-reduce. async: plain "
      "ParameterServerStrategy with the same hyper-parameters. auto: start "
      "in sync, switch to gba while stragglers persist and back when healthy.")
  flags.DEFINE_integer("workers", 4, "Worker tasks.")
  flags.DEFINE_integer("ps", 2, "Parameter server tasks (gba and async).")
  flags.DEFINE_integer("local_batch_size", 256, "Samples per local step.")
  flags.DEFINE_integer(
      "global_batch_size", None,
      "Samples per optimizer step (the synchronous global batch); default "
      "workers * local_batch_size. Sync mode splits it evenly over workers.")
  # Training.
  flags.DEFINE_string(
      "model_dir", None,
      "Checkpoints, the resolved config, switch history and results; "
      "default a new temporary directory.")
  flags.DEFINE_integer("train_steps", 200,
                       "Optimizer steps (global batches) to train.")
  flags.DEFINE_integer(
      "steps_per_loop", 20,
      "Optimizer steps per Keras epoch: the progress-log and checkpoint "
      "interval.")
  flags.DEFINE_enum("optimizer", "adagrad", ("adagrad", "adam", "sgd"),
                    "Optimizer (tf_keras, new API).")
  flags.DEFINE_float("learning_rate", 0.1, "Learning rate (as tuned for "
                     "sync; gba and async reuse it unchanged).")
  flags.DEFINE_enum("model", "embedding_mlp",
                    ("embedding_mlp", "dcn", "deepfm"),
                    "Reference model (gba_tf.models).")
  flags.DEFINE_enum(
      "dataset", "synthetic", ("synthetic", "movielens"),
      "synthetic: Zipf CTR data with a known best AUC. movielens: "
      "MovieLens-100K (rating >= 4 = click), fetched into a cache on first "
      "use.")
  flags.DEFINE_enum(
      "preset", "gba", ("gba", "sync_ps", "backup_workers",
                        "bounded_staleness"),
      "Aggregation rule of --mode=gba (gba_tf.config.GBAConfig.preset): "
      "gba, or the baselines synchronous-over-PS, backup workers (M = "
      "workers - 1, stale gradients dropped) and bounded staleness (M = 1, "
      "dropped past --max_staleness, default 4).")
  flags.DEFINE_enum(
      "input", "sharded", ("sharded", "shared"),
      "sharded: worker i reads its own shard of the training data, so a "
      "fast worker cycles its shard more often than a straggler. shared: "
      "every worker draws from one stream served by the tf.data service "
      "(gba_tf.data.shared_epoch), which the chief task starts: one pass "
      "visits every example once, whatever the worker speeds.")
  flags.DEFINE_integer(
      "data_service_port", 0,
      "Port of the tf.data service dispatcher in the chief task (worker 0 "
      "in sync mode without a chief) for --input=shared. Every task of a "
      "cluster needs the same one; gba-launch picks a free port per phase. "
      "0: any free port, for a one-process job only.")
  flags.DEFINE_integer("embedding_dim", 8, "Embedding width.")
  flags.DEFINE_integer(
      "vocab_per_field", 12_500,
      "--dataset=synthetic: distinct ids per field (8 fields). Fewer ids "
      "are each seen more often, so a model nears the best AUC in fewer "
      "steps.")
  flags.DEFINE_integer("train_examples", 100_000,
                       "Distinct synthetic training examples (repeated).")
  flags.DEFINE_integer("test_examples", 20_000, "Held-out examples.")
  flags.DEFINE_integer("seed", 0, "Seed of the data and the model.")
  flags.DEFINE_integer(
      "eval_examples", 10_000,
      "Held-out examples scored at the end of every loop (the AUC curve in "
      "result.json); 0 for none. Time spent there is not training time.")
  flags.DEFINE_bool(
      "checkpoint_every_loop", True,
      "Checkpoint into <model_dir>/ckpt every loop, so that rerunning a "
      "preempted command resumes from the last loop.")
  # The old name read like the unrelated backup-workers preset.
  flags.DEFINE_alias("backup", "checkpoint_every_loop")
  flags.DEFINE_bool(
      "verify_restore", False,
      "After resuming from a checkpoint, write what was restored (model and "
      "optimizer, slots included) to <model_dir>/restored/ckpt-<step>, to be "
      "compared tensor by tensor with the checkpoint it came from.")
  flags.DEFINE_string(
      "export_dir", None,
      "After training, the chief writes a SavedModel with a serving_default "
      "signature here (gba_tf.export), loadable by plain TensorFlow and TF "
      "Serving; must be new or empty. Default: no export.")
  # GBA staleness policy (see gba_tf.config.GBAConfig).
  flags.DEFINE_integer("staleness_threshold", None,
                       "Gradients this stale or fresher count fully.")
  flags.DEFINE_enum("decay", None, list(staleness.DECAYS),
                    "Weight of gradients past the threshold.")
  flags.DEFINE_float("decay_rate", None, "Parameter of the decay.")
  flags.DEFINE_enum(
      "normalize", None, config.NORMALIZATIONS,
      "A global step's weighted sum of gradients divided by M "
      "(global_batch, the default) or by the sum of the weights (weights).")
  flags.DEFINE_integer("max_staleness", None,
                       "Gradients staler than this are dropped.")
  # Straggler emulation.
  flags.DEFINE_float(
      "step_ms", 0.0,
      "Emulated compute per local step (a sleep in the input pipeline), so "
      "that a 2-core machine can host many workers; 0 for none.")
  flags.DEFINE_string(
      "straggler", "",
      "INDEX:SLOWDOWN[,INDEX:SLOWDOWN...], e.g. 1:4 = worker 1 at a quarter "
      "of the speed, 1:3,5:6 = workers 1 and 5 at a third and a sixth; "
      "empty for none.")
  flags.DEFINE_float(
      "straggler_seconds", 0.0,
      "The straggler recovers this many seconds after launch; 0 = never. "
      "The launcher turns it into --straggler_until.")
  flags.DEFINE_float(
      "straggler_until", 0.0,
      "Unix time at which the straggler recovers; 0 = never. Set by "
      "scripts/launch_local.py.")
  flags.DEFINE_string(
      "straggler_stop_file", "",
      "The straggler recovers once this file exists (checked per batch on "
      "each worker); empty = never. Ends a straggler on an event rather than "
      "on the clock (tests).")
  flags.DEFINE_integer(
      "straggler_period", 0,
      "Seconds; > 0 makes the stragglers move: every period as many "
      "consecutive workers, from one drawn from the clock, are slow at "
      "--straggler's slowdowns, in the order of its indices (soak tests). "
      "0: --straggler's own workers.")
  flags.DEFINE_integer(
      "inject_nonfinite_worker", -1,
      "TEST ONLY: this worker's labels become NaN, so its gradients are not "
      "finite (GBA must reject them). -1: none.")
  flags.DEFINE_bool(
      "trace_pushes", False,
      "Record every GBA push's timestamps on the first PS and report where "
      "their time went (push_phases in the phase's record, raw rows in "
      "push_trace-<mode>.npy; the simulator's calibration reads them). "
      "Costs a few ops per push.")
  # Health monitor and switching.
  flags.DEFINE_integer("health_check_steps", 5,
                       "Optimizer steps between two health checks.")
  flags.DEFINE_integer(
      "health_window", 3,
      "Consecutive checks that must agree before the health state (and, in "
      "auto mode, the training mode) changes.")
  flags.DEFINE_float("health_slow_ratio", 2.0,
                     "A worker this many times slower than its peers' "
                     "median step time is a straggler.")


def parse_straggler(spec: str) -> Dict[int, float]:
  """`"1:3,5:6"` -> `{1: 3.0, 5: 6.0}`; `""` -> `{}` (`gba_tf.stragglers`)."""
  return stragglers.parse(spec)
