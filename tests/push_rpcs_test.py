"""GBA's push adds a few cross-task RPCs to async's, not a few per variable.

Every tensor (or control edge) that crosses tasks inside a step function is
a `_Send`/`_Recv` pair, and each `_Recv` is one RecvTensor RPC each time the
function runs, also for a branch that does not run (the branch's tensors
cross as "dead"). On this project's 2-core machine those RPCs were most of
the parameter servers' extra CPU per push (docs/design.md, "Push and
apply"). The test traces one local step of the benchmark model (DCN-v2, 21
variable shards over 2 PS) under plain ParameterServerStrategy and under
GBAStrategy, has TF dump the partitioned graphs, and counts the RPCs each
PS task receives per local step.

Counted on the landed code: GBA 23 and 18 on ps:0 and ps:1, async 24 and
12. Before the push was trimmed, GBA's were 43 and 22: a finite flag and a
control edge per gradient, the learning rate read once per variable, and
three scalars to each shard.
"""

import collections
import glob
import os
import re
import subprocess
import sys

from google.protobuf import text_format
import gba_tf  # sets TF_USE_LEGACY_KERAS=1 before TensorFlow loads
import tensorflow as tf

from tests import testing_utils

# RPCs GBA may add per PS task and local step: the finite flag, the packed
# decision, the landing barrier, the apply loop's predicate and step.
_EXTRA_PER_TASK = 8

_PARTITION = re.compile(
    r"__inference_step_\d+_partition__job:(\w+)_replica:0_task:(\d+)_"
    r"device:CPU:0\.\d+\.main\.after_partition_passes\.pbtxt$")


def probe(mode: str) -> None:
  """Runs one local step of DCN-v2 under `mode` ("pss" or "gba")."""
  from gba_tf import models  # pylint: disable=g-import-not-at-top
  from gba_tf.launch import local_cluster  # pylint: disable=g-import-not-at-top

  cluster = local_cluster.InProcessCluster(num_workers=2, num_ps=2)
  shards = tf.distribute.experimental.partitioners.FixedShardsPartitioner(2)
  if mode == "gba":
    strategy = gba_tf.GBAStrategy(
        cluster.resolver(),
        gba_tf.GBAConfig(global_batch_size=64, local_batch_size=32), shards)
  else:
    strategy = tf.distribute.experimental.ParameterServerStrategy(
        cluster.resolver(), shards)
  coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
  with strategy.scope():
    model = models.dcn_v2(num_fields=4, vocab_size=400)
    optimizer = tf.keras.optimizers.Adagrad(0.05)
  bce = tf.keras.losses.BinaryCrossentropy(
      from_logits=True, reduction=tf.keras.losses.Reduction.NONE)

  @tf.function
  def step(x, y):
    def replica_fn(x, y):
      with tf.GradientTape() as tape:
        loss = tf.reduce_mean(bce(y, model(x)))
      grads = tape.gradient(loss, model.trainable_variables)
      optimizer.apply_gradients(zip(grads, model.trainable_variables))
    strategy.run(replica_fn, args=(x, y))

  coordinator.schedule(step, args=(tf.zeros([32, 4], tf.int64),
                                   tf.zeros([32, 1])))
  coordinator.join()
  os._exit(0)  # pylint: disable=protected-access


def _received_rpcs(dump_dir: str) -> dict:
  """{'ps:0': n, ...}: cross-task `_Recv`s per task in the step function."""
  from tensorflow.core.framework import graph_pb2  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  counts = {}
  for path in glob.glob(os.path.join(dump_dir, "*.pbtxt")):
    match = _PARTITION.search(os.path.basename(path))
    if not match:
      continue
    graph = graph_pb2.GraphDef()
    with open(path) as f:
      text_format.Parse(f.read(), graph)
    task = f"/job:{match.group(1)}/replica:0/task:{match.group(2)}/"
    received = collections.Counter(
        node.attr["send_device"].s.decode().split("device:")[0]
        for node in graph.node if node.op in ("_Recv", "_HostRecv"))
    counts[f"{match.group(1)}:{match.group(2)}"] = sum(
        n for sender, n in received.items() if sender != task)
  return counts


class PushRpcsTest(tf.test.TestCase):

  def _count(self, mode: str) -> dict:
    dump_dir = testing_utils.temp_dir(self, f"dump_{mode}_")
    env = dict(os.environ, TF_DUMP_GRAPH_PREFIX=dump_dir,
               TF_DUMP_GRAPH_NAME_FILTER="*")
    subprocess.run(
        [sys.executable, "-c",
         f"from tests import push_rpcs_test; push_rpcs_test.probe({mode!r})"],
        cwd=testing_utils.ROOT, env=env, check=True, timeout=300,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    counts = _received_rpcs(dump_dir)
    # One partition per task (the step ran on either worker): a dump that TF
    # stopped writing (or renamed) must fail here, not pass uncounted.
    self.assertCountEqual(
        [task for task in counts if task.startswith("ps:")],
        ["ps:0", "ps:1"], counts)
    self.assertLen([task for task in counts if task.startswith("worker:")],
                   1, counts)
    return counts

  def test_gba_adds_a_bounded_number_of_rpcs_per_ps_task(self):
    pss = self._count("pss")
    gba = self._count("gba")
    for task in ("ps:0", "ps:1"):
      self.assertGreater(pss[task], 0)
      self.assertLessEqual(gba[task], pss[task] + _EXTRA_PER_TASK,
                           f"{task}: GBA {gba}, async {pss}")


if __name__ == "__main__":
  tf.test.main()
