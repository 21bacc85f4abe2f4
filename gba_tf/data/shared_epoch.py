"""A shared epoch: every worker draws from one stream, whatever its speed.

With a fixed shard per worker, a fast worker cycles its shard more often and
a straggler's shard is under-sampled, so comparing training modes under a
straggler also compares different data. In a shared epoch the workers draw
from one stream of examples, served by TensorFlow's own distributed input
engine, the tf.data service (`tf.data.experimental.service`: a dispatcher
and data workers, `processing_mode="distributed_epoch"`). The service hands
each batch of the stream to exactly one training worker, to whichever asks
first: one pass visits every example once, a fast worker takes more of it
and a straggler less, as on a cluster whose workers pull their next batch
when they are ready.

The stream is a sequence of *positions*: position `p` is example
`perm_k(p mod N)` of pass `k = p // N`, with a fresh permutation per pass
computed per position (`tf.random.experimental.index_shuffle`, nothing of
size N is built). What the service distributes is batches of positions; the
training worker gathers its batch's features itself. Two reasons:

* the dataset sent to the dispatcher is a few ops, not the training data;
* the service asks the dispatcher for every split of its source: with one
  example per split it served about 1,900 examples/s here, with one batch
  per split about 1,100 batches/s (of 256).

A job that resumes at optimizer step `s` resumes the stream at position
`s * global_batch_size`: every mode consumes one global batch of positions
per optimizer step, so a restart, or a switch between sync and GBA, goes on
where the last phase stopped.

Example:

>>> service = DataService()                 # dispatcher + 1 data worker
>>> epoch = SharedEpoch(service.target, "train", num_examples=1000, seed=0,
...                     num_samples=1000)   # one pass
>>> positions = epoch.batches(100)          # 10 batches of example indices
"""

import dataclasses
import sys
from typing import List, Optional

import tensorflow as tf

from gba_tf import compat

_SERVICE = tf.data.experimental.service
# Passes of the permutation: more rounds mix better; 4 is TF's default.
_SHUFFLE_ROUNDS = 4


class DataService:
  """A tf.data service dispatcher and its data workers, in this process.

  The job runs it in the chief task: the service only turns positions into
  batches of example indices, a few microseconds of work per batch, so one
  data worker next to the dispatcher keeps up with every training worker.
  The servers live as long as this object (and TF keeps them until the
  process exits).

  Args:
    port: the dispatcher's port; 0 picks a free one.
    num_workers: data workers to start (>= 1).
    host: the address other tasks reach this process at.
  """

  def __init__(self, port: int = 0, num_workers: int = 1,
               host: str = "127.0.0.1"):
    if isinstance(port, bool) or not isinstance(port, int) or not (
        0 <= port < 65536):
      raise ValueError(f"Received: port={port!r}, which must be an integer "
                       "in [0, 65535].")
    if isinstance(num_workers, bool) or not isinstance(
        num_workers, int) or num_workers < 1:
      raise ValueError(f"Received: num_workers={num_workers!r}, which must "
                       "be an integer >= 1.")
    self._dispatcher = _SERVICE.DispatchServer(
        _SERVICE.DispatcherConfig(port=port))
    self.port = int(self._dispatcher.target.rsplit(":", 1)[1])
    self.target = f"grpc://{host}:{self.port}"
    self._workers: List[_SERVICE.WorkerServer] = [
        _SERVICE.WorkerServer(_SERVICE.WorkerConfig(
            dispatcher_address=f"{host}:{self.port}", port=0,
            worker_address=f"{host}:%port%"))
        for _ in range(num_workers)]


@dataclasses.dataclass(frozen=True)
class SharedEpoch:
  """One stream of example positions, shared by every training worker.

  Attributes:
    service: the dispatcher's address, e.g. "grpc://10.0.0.1:2225".
    job_name: the service job every worker of one training phase shares.
    num_examples: N, the examples of one pass.
    seed: the permutations' seed (pass k uses `[seed, k]`).
    start: the first position served (resuming: optimizer steps done x
      global batch).
    num_samples: positions served from `start` on; None for an endless
      stream (the job stops after its steps).
  """
  service: str
  job_name: str
  num_examples: int
  seed: int = 0
  start: int = 0
  num_samples: Optional[int] = None

  def __post_init__(self):
    for name in ("num_examples", "start", "num_samples", "seed"):
      value = getattr(self, name)
      if value is None and name == "num_samples":
        continue
      low = 1 if name in ("num_examples", "num_samples") else 0
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Received: {name}={value!r}, which must be an "
                         f"integer >= {low}.")
    if not self.service.startswith("grpc://"):
      raise ValueError(f"Received: service={self.service!r}, which must be "
                       "a grpc:// address of a tf.data service dispatcher.")

  def example(self, positions):
    """The example index at each position (int64 tensor in, int64 out)."""
    n = self.num_examples
    positions = tf.convert_to_tensor(positions, tf.int64)
    seeds = tf.stack([tf.fill(tf.shape(positions), tf.constant(
        self.seed, tf.int64)), positions // n, tf.zeros_like(positions)],
                     axis=1)
    # The public wrapper takes one seed for every index; a per-pass seed
    # per position needs the op's [n, 3] form.
    return tf.raw_ops.RandomIndexShuffle(
        index=positions % n, seed=seeds,
        max_index=tf.constant(n - 1, tf.int64), rounds=_SHUFFLE_ROUNDS)

  def batches(self, batch_size: int) -> tf.data.Dataset:
    """Batches of example indices, each handed to one worker only.

    Call it in a `dataset_fn`: every training worker that iterates it
    consumes from the same service job. The last batch of a finite stream
    may be smaller.
    """
    if isinstance(batch_size, bool) or not isinstance(
        batch_size, int) or batch_size < 1:
      raise ValueError(f"Received: batch_size={batch_size!r}, which must be "
                       "an integer >= 1.")
    start = self.start
    end = (sys.maxsize if self.num_samples is None
           else start + self.num_samples)
    num_batches = -(-(end - start) // batch_size)

    def positions(b):
      first = start + b * batch_size
      return self.example(tf.range(first, tf.minimum(first + batch_size,
                                                     end), dtype=tf.int64))

    compat.forget_data_service_functions()
    # The range is the source the dispatcher splits: one split per batch.
    # No compression: a batch of indices is small, and compressing it would
    # cost CPU on both ends for nothing.
    return tf.data.Dataset.range(num_batches).map(positions).apply(
        _SERVICE.distribute(processing_mode="distributed_epoch",
                            service=self.service, job_name=self.job_name,
                            compression=None))
