"""Profile of the serialized part of a GBA push: how long its lock is held.

Runs the throughput benchmark's job (one OS process per task, gRPC on
loopback) under GBA with `GradientAggregator.enable_hold_profile()`, then
reports the hold time of the critical section(s) on the first PS task per
push (p50, p99, mean) and the pushes/s ceiling that serialization implies:
one push holds the lock `held_per_push` seconds in all, so no cluster of any
size can push faster than `1 / held_per_push`.

  python scripts/profile_push.py --workers=4 --ps=2 --steps=400
"""

import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gba_tf  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
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
  flags.DEFINE_integer("steps", 400, "Profiled local steps.")
  flags.DEFINE_string("out", "results/push_profile.json", "JSON output.")
  FLAGS.set_default("workers", 4)
  FLAGS.set_default("ps", 2)


def main(argv):
  del argv
  config = job_config.gba_config_from_flags()
  data = synthetic.SyntheticCTR()
  ids, labels = data.sample(65_536)
  with local_cluster.LocalCluster(FLAGS.workers, FLAGS.ps) as cluster:
    strategy = gba_tf.GBAStrategy(
        cluster.resolver(), config,
        tf.distribute.experimental.partitioners.FixedShardsPartitioner(
            FLAGS.ps))
    aggregator = strategy.extended.aggregator
    aggregator.enable_hold_profile()
    with strategy.scope():
      model = models.embedding_mlp(data.num_fields, data.vocab_size)
      model.compile(tf.keras.optimizers.Adagrad(0.05),
                    tf.keras.losses.BinaryCrossentropy(from_logits=True))
    dataset_fn = synthetic.dataset_fn(ids, labels, FLAGS.local_batch_size,
                                      FLAGS.step_ms,
                                      gba_flags.parse_straggler(
                                          FLAGS.straggler))
    creator = tf.keras.utils.experimental.DatasetCreator(dataset_fn)
    model.fit(creator, epochs=1, steps_per_epoch=FLAGS.steps, verbose=0)
    holds = np.asarray(aggregator.hold_profile(), np.float64)
    pushes = strategy.gba_metrics()["pushed"]
  per_push = holds.sum() / max(pushes, 1)
  report = {
      "workers": FLAGS.workers, "ps": FLAGS.ps, "pushes": pushes,
      "sections": int(holds.size),
      "hold_micros_p50": float(np.percentile(holds, 50)),
      "hold_micros_p99": float(np.percentile(holds, 99)),
      "hold_micros_mean": float(holds.mean()),
      "held_micros_per_push": float(per_push),
      "pushes_per_s_ceiling": float(1e6 / per_push),
  }
  print(json.dumps(report, indent=2))
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(report, f, indent=2)
  tasks.exit_now(0)


if __name__ == "__main__":
  define_flags()
  app.run(main)
