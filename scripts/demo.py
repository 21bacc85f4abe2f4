"""Demo: GBA on a local multi-process cluster with an injected straggler.

Starts 4 workers + 2 PS (one OS process each, gRPC on loopback), slows
worker 1 to a quarter of the speed, trains a CTR model on synthetic Zipf data
with GBA, and prints what GBA did: optimizer steps, staleness, each worker's
share of the gradients, and the test AUC against the best achievable.

  python scripts/demo.py                # the `make demo` default
  python scripts/demo.py --workers=2 --ps=1 --epochs=2 --steps_per_epoch=30
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gba_tf  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from gba_tf import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf.data import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf.launch import flags as gba_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf.launch import job_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf.launch import local_cluster  # pylint: disable=g-import-not-at-top,wrong-import-position
from gba_tf.launch import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  gba_flags.define_flags()
  flags.DEFINE_integer("epochs", 4, "Epochs.")
  flags.DEFINE_integer("steps_per_epoch", 100, "Local steps per epoch.")
  flags.DEFINE_string("out", "results/demo.json", "JSON summary.")
  # Worker 1 at a quarter of the speed; 50 ms of emulated compute makes the
  # difference visible on 2 cores shared by 7 processes.
  FLAGS.set_default("step_ms", 50.0)
  FLAGS.set_default("straggler", "1:4")
  FLAGS.set_default("learning_rate", 0.2)


def _copy_to_local(model, data):
  """Moves trained (sharded) weights to this process via a checkpoint."""
  local = models.embedding_mlp(data.num_fields, data.vocab_size)
  with tempfile.TemporaryDirectory(prefix="gba_demo_") as tmp:
    path = tf.train.Checkpoint(model=model).write(os.path.join(tmp, "ckpt"))
    # expect_partial: the checkpoint also holds the optimizer, not needed.
    tf.train.Checkpoint(model=local).read(path).expect_partial(
    ).assert_existing_objects_matched()
  return local


def main(argv):
  del argv
  config = job_config.gba_config_from_flags()
  stragglers = gba_flags.parse_straggler(FLAGS.straggler)
  slow = ", ".join(f"worker {i} at 1/{k:g} speed"
                   for i, k in sorted(stragglers.items())) or "no straggler"
  data = synthetic.SyntheticCTR()
  train_ids, train_labels = data.sample(
      FLAGS.epochs * FLAGS.steps_per_epoch * FLAGS.local_batch_size, seed=1)
  test_ids, test_labels = data.sample(20_000, seed=3)
  print(f"GBA demo: {FLAGS.workers} workers + {FLAGS.ps} PS on localhost; "
        f"{slow}; "
        f"M = {config.num_aggregate} local batches of "
        f"{config.local_batch_size} per optimizer step.", flush=True)

  with local_cluster.LocalCluster(FLAGS.workers, FLAGS.ps) as cluster:
    strategy = gba_tf.GBAStrategy(
        cluster.resolver(), config,
        tf.distribute.experimental.partitioners.FixedShardsPartitioner(
            FLAGS.ps))
    with strategy.scope():
      model = models.embedding_mlp(data.num_fields, data.vocab_size)
      model.compile(tf.keras.optimizers.Adagrad(FLAGS.learning_rate),
                    tf.keras.losses.BinaryCrossentropy(from_logits=True))

    dataset_fn = synthetic.dataset_fn(
        train_ids, train_labels, FLAGS.local_batch_size, FLAGS.step_ms,
        stragglers, shuffle_seed=0)

    start = time.perf_counter()
    history = model.fit(
        tf.keras.utils.experimental.DatasetCreator(dataset_fn),
        epochs=FLAGS.epochs, steps_per_epoch=FLAGS.steps_per_epoch,
        verbose=2, callbacks=[gba_tf.callbacks.GBAMetrics(strategy)])
    seconds = time.perf_counter() - start
    metrics = strategy.gba_metrics()
    iterations = int(model.optimizer.iterations.numpy())
    local = _copy_to_local(model, data)

  logits = local.predict(test_ids, batch_size=4096, verbose=0).ravel()
  test_auc = synthetic.auc(test_labels, logits)
  local_steps = FLAGS.epochs * FLAGS.steps_per_epoch
  summary = {
      "config": config.get_config(),
      "workers": FLAGS.workers, "ps": FLAGS.ps,
      "straggler": FLAGS.straggler,
      "seconds": seconds, "local_steps": local_steps,
      "samples_per_s": local_steps * FLAGS.local_batch_size / seconds,
      "loss": history.history["loss"],
      "optimizer_iterations": iterations,
      "test_auc": test_auc, "best_auc": data.best_auc(),
      "gba": metrics,
  }
  hist = metrics["staleness_histogram"]
  last = max([t for t, n in enumerate(hist) if n] or [0])
  print("\n=== GBA demo summary ===")
  print(f"wall clock           {seconds:8.1f} s "
        f"({summary['samples_per_s']:.0f} samples/s)")
  print(f"loss                 {history.history['loss'][0]:.4f} -> "
        f"{history.history['loss'][-1]:.4f}")
  print(f"test AUC             {test_auc:.4f} (best achievable "
        f"{summary['best_auc']:.4f})")
  print(f"gradients            pushed {metrics['pushed']}, applied "
        f"{metrics['applied']}, decayed {metrics['decayed']}, dropped "
        f"{metrics['dropped']}, pending {metrics['pending']}")
  print(f"optimizer steps      {iterations} (M = {config.num_aggregate})")
  print("staleness histogram  " +
        " ".join(f"{t}:{n}" for t, n in enumerate(hist[:last + 1])))
  for i, (n, s) in enumerate(zip(metrics["worker_pushed"],
                                 metrics["worker_mean_step_seconds"])):
    tag = "  <- straggler" if i in stragglers else ""
    print(f"worker {i}             {n:5d} gradients, "
          f"{1000 * s:6.1f} ms token-to-push{tag}")
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(summary, f, indent=2)
  print(f"wrote {FLAGS.out}")
  tasks.exit_now(0)


if __name__ == "__main__":
  define_flags()
  app.run(main)
