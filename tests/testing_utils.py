"""Shared test helpers: one in-process cluster per pytest process."""

import functools
import gc
import json
import os
import shutil
import tempfile

import gba_tf
import tensorflow as tf

# Every unit test that needs servers shares this shape: 2 workers so that one
# can be held while the other runs, 2 PS so that sharded variables really are
# split across PS tasks.
NUM_WORKERS = 2
NUM_PS = 2


@functools.lru_cache(maxsize=None)
def shared_cluster() -> gba_tf.cluster.InProcessCluster:
  """Servers cannot be stopped in TF 2.21, so build them once per process."""
  return gba_tf.cluster.InProcessCluster(num_workers=NUM_WORKERS,
                                         num_ps=NUM_PS)


# Objects that hold remote handles on a test's own LocalCluster. Once that
# cluster is stopped and the context has moved to another cluster, TF 2.21
# segfaults when the garbage collector destroys such a variable (seen in
# `make test`, inside a later test's tracing); keeping them alive for the
# life of the pytest process avoids the remote destroy.
_KEEP_ALIVE = []


def keep_alive(*objects) -> None:
  """Never garbage-collect `objects` (remote handles of a stopped cluster)."""
  _KEEP_ALIVE.append(objects)


def collect_before_switching_cluster() -> None:
  """Destroys unreachable remote objects while their cluster is current.

  A test that connects to a cluster of its own moves the eager context
  away from the shared one; a variable of the shared cluster destroyed
  after that (e.g. a Keras model in a reference cycle, freed by a later
  garbage collection) segfaults TF 2.21 the same way. Call right before
  connecting elsewhere.
  """
  gc.collect()


def two_shards():
  return tf.distribute.experimental.partitioners.FixedShardsPartitioner(2)


def shard_devices(sharded_variable):
  return [v.device for v in sharded_variable.variables]


def read_job_file(model_dir: str, name: str):
  """A JSON file a job wrote into its model directory (.jsonl: a list)."""
  with open(os.path.join(model_dir, name)) as f:
    if name.endswith(".jsonl"):
      return [json.loads(line) for line in f]
    return json.load(f)


def temp_dir(test, prefix: str) -> str:
  """A fresh directory removed when `test` ends.

  Model directories of whole jobs hold checkpoints (~20 MB each); set
  GBA_KEEP_TEST_DIRS=1 to keep them for a post-mortem.
  """
  path = tempfile.mkdtemp(prefix=prefix)
  if not os.environ.get("GBA_KEEP_TEST_DIRS"):
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path
