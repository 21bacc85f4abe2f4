"""GBA's push: a few cross-task RPCs over async's, and no apply in it.

Every tensor (or control edge) that crosses tasks inside a step function is
a `_Send`/`_Recv` pair, and each `_Recv` is one RecvTensor RPC each time the
function runs, also for a branch that does not run (the branch's tensors
cross as "dead"). On this project's 2-core machine those RPCs were most of
the parameter servers' extra CPU per push (docs/design.md, "Push and
apply"). The test traces one local step of the benchmark model (DCN-v2, 21
variable shards over 2 PS) under plain ParameterServerStrategy and under
GBAStrategy, has TF dump the partitioned graphs, and counts the RPCs each
PS task receives per local step.

Counted on the landed code: GBA 7 and 6 on ps:0 and ps:1, async 24 and
12. Before the push was trimmed, GBA's were 43 and 22: a finite flag and a
control edge per gradient, the learning rate read once per variable, and
three scalars to each shard; then 23 and 18 while the apply was a branch of
every push, 20 and 14 while the add was one, and 19 and 13 while each dense
gradient crossed on its own, the token and its read time went to the
worker and back, and the worker's index crossed on its own.

The same dump shows what each PS task runs per push: the optimizer's update
must not be there (`gba_tf.applier` applies global steps in a function of
its own). With the apply as a branch of the push, the PS tasks ran 764 and
513 nodes per push (async: 171 and 176); without, 422 and 224; with no
branch in the push either (the add, the ticket, the reply), 356 and 186;
with the dense gradients packed, 308 and 138.
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

# RPCs GBA may add per PS task and local step over async's. None: the
# finite flag, the packed decision and the landing barrier that GBA adds
# cost fewer RPCs than the dense gradients that async sends one by one and
# GBA packs into one tensor per task.
_EXTRA_PER_TASK = 0

# Gradient tensors (float) a worker sends each PS task per GBA push: the
# task's dense gradients packed into one, and the values of the one sparse
# (embedding) shard there.
_GRADIENT_TENSORS_PER_TASK = 2

# Adagrad's update (accumulator += g^2; var -= lr * g / sqrt(accumulator)):
# an op only the optimizer's apply runs.
_UPDATE_OP = "Rsqrt"

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


def _partitions(dump_dir: str) -> dict:
  """{'ps:0': (cross-task `_Recv`s, op types, float `_Recv`s from a
  worker), ...} of the step function."""
  from tensorflow.core.framework import graph_pb2  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  partitions = {}
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
    floats = sum(
        1 for node in graph.node if node.op in ("_Recv", "_HostRecv")
        and "/job:worker/" in node.attr["send_device"].s.decode()
        and node.attr["tensor_type"].type == tf.float32.as_datatype_enum)
    partitions[f"{match.group(1)}:{match.group(2)}"] = (
        sum(n for sender, n in received.items() if sender != task),
        {node.op for node in graph.node}, floats)
  return partitions


class PushRpcsTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.partitions = {}

  def _partitions(self, mode: str) -> dict:
    if mode not in self.partitions:
      self.partitions[mode] = self._dump(mode)
    return self.partitions[mode]

  def _dump(self, mode: str) -> dict:
    dump_dir = testing_utils.temp_dir(self, f"dump_{mode}_")
    env = dict(os.environ, TF_DUMP_GRAPH_PREFIX=dump_dir,
               TF_DUMP_GRAPH_NAME_FILTER="*")
    subprocess.run(
        [sys.executable, "-c",
         f"from tests import push_rpcs_test; push_rpcs_test.probe({mode!r})"],
        cwd=testing_utils.ROOT, env=env, check=True, timeout=300,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partitions = _partitions(dump_dir)
    # One partition per task (the step ran on either worker): a dump that TF
    # stopped writing (or renamed) must fail here, not pass uncounted.
    self.assertCountEqual(
        [task for task in partitions if task.startswith("ps:")],
        ["ps:0", "ps:1"], list(partitions))
    self.assertLen([task for task in partitions
                    if task.startswith("worker:")], 1, list(partitions))
    return partitions

  def test_gba_adds_a_bounded_number_of_rpcs_per_ps_task(self):
    pss = {task: rpcs for task, (rpcs, _, _) in self._partitions("pss").items()}
    gba = {task: rpcs for task, (rpcs, _, _) in self._partitions("gba").items()}
    for task in ("ps:0", "ps:1"):
      self.assertGreater(pss[task], 0)
      self.assertLessEqual(gba[task], pss[task] + _EXTRA_PER_TASK,
                           f"{task}: GBA {gba}, async {pss}")

  def test_the_optimizer_update_is_not_part_of_a_push(self):
    # Async applies in every push: the op is found where it runs.
    pss = self._partitions("pss")
    self.assertTrue(any(_UPDATE_OP in ops for _, ops, _ in pss.values()))
    for task, (_, ops, _) in self._partitions("gba").items():
      self.assertNotIn(_UPDATE_OP, ops, task)

  def test_dense_gradients_cross_to_each_task_as_one_tensor(self):
    # Async sends each of DCN-v2's dense gradients on its own (the control:
    # the count sees them), GBA one packed tensor per task.
    pss = self._partitions("pss")
    gba = self._partitions("gba")
    for task in ("ps:0", "ps:1"):
      self.assertGreater(pss[task][2], _GRADIENT_TENSORS_PER_TASK, task)
      self.assertEqual(gba[task][2], _GRADIENT_TENSORS_PER_TASK, task)


if __name__ == "__main__":
  tf.test.main()
