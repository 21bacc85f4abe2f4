"""The shared-epoch input (`gba_tf.data.shared_epoch`): one stream, served by
the tf.data service, that every worker draws from whatever its speed."""

import json
import os

import gba_tf
import numpy as np
import tensorflow as tf

from gba_tf.data import shared_epoch
from gba_tf.data import synthetic
from tests import testing_utils


class StreamTest(tf.test.TestCase):

  def test_each_pass_is_a_permutation_and_passes_differ(self):
    # 3 passes of N = 50: positions 0-49, 50-99, 100-149.
    epoch = shared_epoch.SharedEpoch("grpc://127.0.0.1:1", "unused",
                                     num_examples=50, seed=7)
    examples = epoch.example(tf.range(150, dtype=tf.int64)).numpy()
    passes = examples.reshape(3, 50)
    for one in passes:
      self.assertEqual(sorted(one.tolist()), list(range(50)))
    self.assertNotEqual(passes[0].tolist(), passes[1].tolist())
    self.assertNotEqual(passes[0].tolist(), list(range(50)))
    # A function of the position alone: the same seed gives the same stream,
    # so a resumed job (start = steps done x global batch) goes on with it.
    again = shared_epoch.SharedEpoch("grpc://127.0.0.1:1", "unused",
                                     num_examples=50, seed=7)
    self.assertAllEqual(again.example(tf.constant([120, 3], tf.int64)),
                        [passes[2][20], passes[0][3]])

  def test_bad_input_is_one_line_naming_the_value(self):
    for kwargs, text in (
        (dict(num_examples=0), "num_examples=0"),
        (dict(num_examples=5, start=-1), "start=-1"),
        (dict(num_examples=5, num_samples=0), "num_samples=0"),
        (dict(num_examples=5, service="127.0.0.1:5"), "service='127.0.0.1"),
    ):
      args = dict(dict(service="grpc://127.0.0.1:1", job_name="x"), **kwargs)
      with self.assertRaisesRegex(ValueError, f"Received: {text}"):
        shared_epoch.SharedEpoch(**args)
    with self.assertRaisesRegex(ValueError, "Received: port=-2"):
      shared_epoch.DataService(port=-2)


class ServiceTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # Two data workers: the service splits the stream between them, and a
    # pipeline that is not split (each data worker reading all of it,
    # "parallel_epochs") would serve every example twice.
    cls.service = shared_epoch.DataService(num_workers=2)

  def test_a_resumed_stream_serves_the_positions_after_start(self):
    # N = 100, positions 250-449: the second half of pass 2 (positions
    # 250-299), then pass 3 (300-399) and the first half of pass 4
    # (400-449): 50 examples once, 50 twice... by position, exactly.
    epoch = shared_epoch.SharedEpoch(self.service.target, "resumed",
                                     num_examples=100, seed=1, start=250,
                                     num_samples=200)
    served = np.concatenate([b.numpy() for b in epoch.batches(32)])
    expected = epoch.example(tf.range(250, 450, dtype=tf.int64)).numpy()
    self.assertEqual(sorted(served.tolist()), sorted(expected.tolist()))
    self.assertLen(served, 200)

  def test_one_epoch_under_a_straggler_visits_every_example_once(self):
    # 2,048 examples in batches of 8 over 2 GBA workers, worker 1 at a
    # quarter of the speed (20 ms per batch against 5 ms). Each worker
    # drains its iterator in closures of ClusterCoordinator; together they
    # must see every example exactly once, the fast worker most of them.
    n, batch = 2048, 8
    epoch = shared_epoch.SharedEpoch(self.service.target, "straggler",
                                     num_examples=n, seed=3, num_samples=n)
    ids = np.arange(n, dtype=np.int64).reshape(-1, 1)
    labels = np.zeros(n, np.float32)
    dataset_fn = synthetic.dataset_fn(ids, labels, batch, step_ms=5.0,
                                      stragglers={1: 4.0}, num_workers=2,
                                      shared=epoch)
    strategy = gba_tf.GBAStrategy(
        testing_utils.shared_cluster().resolver(),
        gba_tf.GBAConfig(global_batch_size=2 * batch,
                         local_batch_size=batch))
    coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(
        strategy)
    # As Keras' DatasetCreator builds it (created directly from
    # `dataset_fn`, the workers miss the service dataset's functions).
    iterators = iter(coordinator.create_per_worker_dataset(
        lambda: strategy.distribute_datasets_from_function(dataset_fn)))

    @tf.function
    def drain(iterator):
      rows = tf.TensorArray(tf.int64, size=0, dynamic_size=True,
                            infer_shape=False,
                            element_shape=tf.TensorShape([None]))
      count = tf.constant(0)
      for x, _ in iterator:
        rows = rows.write(count, tf.reshape(x, [-1]))
        count += 1
      worker = tf.distribute.coordinator.experimental_get_current_worker_index()
      return rows.concat(), worker

    results = [coordinator.schedule(drain, args=(iterators,))
               for _ in range(4)]
    coordinator.join()
    seen = {0: [], 1: []}
    for result in results:
      rows, worker = result.fetch()
      seen[int(worker)].extend(rows.tolist())
    everything = sorted(seen[0] + seen[1])
    self.assertEqual(everything, list(range(n)))
    # The straggler takes far fewer batches than its fair half (about a
    # fifth; what each worker's service client buffered at the start
    # counts too).
    self.assertLess(len(seen[1]), len(seen[0]) / 2, (len(seen[0]),
                                                     len(seen[1])))
    testing_utils.keep_alive(strategy, coordinator, iterators)


class JobTest(tf.test.TestCase):

  def test_gba_job_with_a_straggler_shares_the_stream(self):
    # --input=shared: the chief starts the tf.data service, the workers
    # train from it (which examples each saw is the in-process test's
    # check); every scheduled local step got a batch (pushed = 80, all
    # applied), and worker 1, at a quarter of the speed, took fewer.
    model_dir = testing_utils.temp_dir(self, "shared_epoch")
    job = testing_utils.LaunchedJob(
        self, model_dir, "--mode=gba", "--input=shared", "--straggler=1:4",
        "--train_steps=40", "--steps_per_loop=20", "--train_examples=10240",
        "--eval_examples=0")
    self.assertEqual(job.finish(), 0, job.excerpt())
    self.assertIn("tf.data service at grpc://127.0.0.1:", job.output)
    with open(os.path.join(model_dir, "phases.jsonl")) as f:
      phase = json.loads(f.readline())
    gba = phase["gba"]
    self.assertEqual(gba["pushed"], 80)
    self.assertEqual(gba["applied"], 80)
    fast, slow = gba["worker_pushed"]
    self.assertLess(slow, fast, gba["worker_pushed"])
    with open(os.path.join(model_dir, "config-gba.json")) as f:
      self.assertEqual(json.load(f)["input"], "shared")


if __name__ == "__main__":
  tf.test.main()
