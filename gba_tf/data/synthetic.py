"""Synthetic click-through data with a known best AUC, and straggler injection.

Ids of every categorical field follow a Zipf law (a few hot ids, a long
tail), as in production CTR logs. Labels are drawn from a hidden
factorization-machine model, so the probability of every example, and hence
the best achievable AUC, is known.

Example:

>>> data = SyntheticCTR(num_fields=8, vocab_per_field=12_500, seed=0)
>>> ids, labels = data.sample(4)
>>> ids.shape, labels.shape
((4, 8), (4,))
"""

import dataclasses
import functools
from typing import Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from gba_tf import compat
from gba_tf import stragglers as stragglers_lib
from gba_tf import tokens


@dataclasses.dataclass(frozen=True)
class SyntheticCTR:
  """Deterministic-by-seed Zipf CTR generator with a hidden FM label model.

  Ids are global: field `f` owns ids `[f * vocab_per_field, (f + 1) *
  vocab_per_field)`, so one embedding table of `vocab_size` rows serves all
  fields.

  Attributes:
    num_fields: categorical fields per example.
    vocab_per_field: distinct ids per field.
    zipf_exponent: `P(rank r) ~ r ** -zipf_exponent` within a field.
    factor_dim: rank of the hidden pairwise interactions.
    seed: fixes the hidden model; `sample(n, seed=...)` fixes the examples.
  """

  num_fields: int = 8
  vocab_per_field: int = 12_500
  zipf_exponent: float = 1.1
  factor_dim: int = 4
  seed: int = 0

  def __post_init__(self):
    for name in ("num_fields", "vocab_per_field", "factor_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"Received: {name}={value!r}, which must be an "
                         "integer > 0.")
    if not self.zipf_exponent > 0:
      raise ValueError(f"Received: zipf_exponent={self.zipf_exponent!r}, "
                       "which must be > 0.")

  @property
  def vocab_size(self) -> int:
    return self.num_fields * self.vocab_per_field

  @functools.cached_property
  def _hidden(self):
    # Drawn once per instance: every sample() and logits() call uses it.
    rng = np.random.default_rng(self.seed)
    weights = rng.normal(0.0, 0.6, self.vocab_size)
    factors = rng.normal(0.0, 0.35, (self.vocab_size, self.factor_dim))
    return weights, factors

  def rank_probabilities(self) -> np.ndarray:
    ranks = np.arange(1, self.vocab_per_field + 1, dtype=np.float64)
    p = ranks ** -self.zipf_exponent
    return p / p.sum()

  def logits(self, ids: np.ndarray) -> np.ndarray:
    """Hidden model: bias + sum of id weights + FM pairwise interactions."""
    weights, factors = self._hidden
    v = factors[ids]                                   # [n, F, k]
    pairwise = 0.5 * ((v.sum(1) ** 2) - (v ** 2).sum(1)).sum(1)
    return -0.5 + weights[ids].sum(1) + pairwise

  def sample(self, n: int, seed: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """`n` examples: int64 ids [n, num_fields], float32 labels [n]."""
    rng = np.random.default_rng([self.seed, seed])
    ranks = rng.choice(self.vocab_per_field, size=(n, self.num_fields),
                       p=self.rank_probabilities())
    ids = ranks + np.arange(self.num_fields) * self.vocab_per_field
    prob = 1.0 / (1.0 + np.exp(-self.logits(ids)))
    labels = (rng.random(n) < prob).astype(np.float32)
    return ids.astype(np.int64), labels

  def best_auc(self, n: int = 50_000, seed: int = 2) -> float:
    """AUC of the true probabilities on a fresh sample (the ceiling)."""
    ids, labels = self.sample(n, seed=seed)
    return auc(labels, self.logits(ids))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC by the rank-sum formula (ties get average ranks)."""
  labels = np.asarray(labels).ravel()
  _, inverse, counts = np.unique(np.asarray(scores).ravel(),
                                 return_inverse=True, return_counts=True)
  # 1-based rank of each distinct score, averaged over its ties.
  last = np.cumsum(counts)
  ranks = (last - (counts - 1) / 2.0)[inverse]
  pos = labels > 0.5
  n_pos, n_neg = pos.sum(), (~pos).sum()
  if n_pos == 0 or n_neg == 0:
    raise ValueError("Received labels of one class only; AUC is undefined.")
  return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def validate_examples(ids, labels, num_fields: Optional[int] = None,
                      vocab_size: Optional[int] = None) -> None:
  """Checks a CTR example array before any training starts.

  Raises:
    ValueError: naming the bad dtype or shape: ids must be integers
      [n, num_fields], labels numbers [n] or [n, 1] in [0, 1].
  """
  ids, labels = np.asarray(ids), np.asarray(labels)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or (
      num_fields is not None and ids.shape[1] != num_fields):
    expected = f"[n, {num_fields}]" if num_fields else "[n, fields]"
    raise ValueError(f"Received: ids of dtype {ids.dtype} and shape "
                     f"{ids.shape}; expected integer ids {expected}.")
  if labels.shape not in ((len(ids),), (len(ids), 1)) or not (
      np.issubdtype(labels.dtype, np.number) or labels.dtype == bool):
    raise ValueError(f"Received: labels of dtype {labels.dtype} and shape "
                     f"{labels.shape}; expected {len(ids)} numeric labels.")
  if len(ids) == 0:
    raise ValueError("Received: 0 examples.")
  if ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size):
    raise ValueError(f"Received: ids in [{ids.min()}, {ids.max()}], outside "
                     f"the vocabulary [0, {vocab_size}).")


def dataset_fn(ids: np.ndarray, labels: np.ndarray, local_batch_size: int,
               step_ms: float = 0.0,
               stragglers: Optional[Mapping[int, float]] = None,
               shuffle_seed=None, *,
               num_shards: int = 1, straggler_until: float = 0.0,
               global_batch_size: Optional[int] = None,
               straggler_period: float = 0.0, num_workers: int = 1,
               nonfinite_worker: int = -1, straggler_stop_file: str = "",
               shared=None):
  """A `dataset_fn` for `DatasetCreator` / per-worker datasets.

  Repeats `(ids, labels[:, None])` in batches, optionally shuffled, with the
  emulated compute of `with_straggler` as the last stage. With
  `num_shards > 1` worker `i` reads shard `i`, in both modes: the worker
  index comes from ClusterCoordinator (PS modes) or from
  `input_context.input_pipeline_id` (MultiWorkerMirroredStrategy).

  With `global_batch_size` the batch is the per-replica share that
  `input_context` computes (MultiWorkerMirroredStrategy: global / workers);
  otherwise `local_batch_size`.

  With `shared` (a `gba_tf.data.shared_epoch.SharedEpoch` over these
  examples) every worker instead takes its batches from the one stream the
  tf.data service serves, and gathers their features here, on the worker.
  """
  validate_examples(ids, labels)
  labels = np.asarray(labels, np.float32).reshape(-1, 1)

  def fn(input_context=None):
    index = worker_index(input_context)
    batch = local_batch_size
    if global_batch_size is not None and input_context is not None:
      batch = input_context.get_per_replica_batch_size(global_batch_size)
    if shared is not None:
      table_ids, table_labels = tf.constant(ids), tf.constant(labels)
      ds = shared.batches(batch).map(lambda rows: (
          tf.gather(table_ids, rows), tf.gather(table_labels, rows)))
    else:
      ds = tf.data.Dataset.from_tensor_slices((ids, labels))
      if num_shards > 1:
        ds = ds.shard(num_shards, tf.maximum(tf.cast(index, tf.int64), 0))
      if shuffle_seed is not None:
        ds = ds.shuffle(8192, seed=shuffle_seed)
      ds = ds.repeat().batch(batch, drop_remainder=True)
    if nonfinite_worker >= 0:
      poisoned = tf.equal(index, nonfinite_worker)
      ds = ds.map(lambda x, y: (x, tf.where(poisoned, y * np.nan, y)))
    ds = ds.prefetch(2)
    return with_straggler(ds, step_ms, stragglers,
                          until=straggler_until, index=index,
                          period=straggler_period, num_workers=num_workers,
                          stop_file=straggler_stop_file)

  return fn


def worker_index(input_context=None):
  """This worker's index inside a `dataset_fn`, as a tensor (-1: unknown).

  ParameterServerStrategy traces the `dataset_fn` once for all workers and
  passes `input_pipeline_id == 0` to each: the index is bound at run time by
  ClusterCoordinator. MultiWorkerMirroredStrategy calls it in each worker
  process with its own `input_pipeline_id`.
  """
  index = tokens.current_worker_index()
  if index is not None:
    return index
  if input_context is not None and input_context.num_input_pipelines > 1:
    return tf.constant(input_context.input_pipeline_id, tf.int64)
  return tf.constant(-1, tf.int64)


def with_straggler(dataset: tf.data.Dataset, step_ms: float,
                   stragglers: Optional[Mapping[int, float]] = None,
                   until: float = 0.0, index=None, period: float = 0.0,
                   num_workers: int = 1, stop_file: str = ""):
  """Emulates per-step compute time, with some workers slower than others.

  On a machine with fewer cores than workers, real compute would make all
  workers contend for the same cores; a sleep per batch gives every worker
  its own "compute" instead, so adding workers adds throughput as on a real
  cluster. Call inside a `dataset_fn`: the slow workers are chosen by the
  runtime worker index (see `worker_index`).

  The sleep runs one batch ahead of training (a prefetch of 1 after it), so
  a worker's step takes max(step_ms, its real compute), as on a worker
  whose input pipeline and communication overlap its compute; a slow
  worker delivers at most one batch per `slowdown * step_ms`, whatever it
  buffered before.

  Example: `stragglers={1: 3.0, 5: 6.0}` runs worker 1 at a third and
  worker 5 at a sixth of the speed (`gba_tf.stragglers.parse("1:3,5:6")`).

  Args:
    dataset: batched dataset.
    step_ms: emulated compute time of one batch on a healthy worker.
    stragglers: worker index -> slowdown (4.0 = a quarter of the speed);
      None or {} for none.
    until: Unix time after which the stragglers recover (checked per batch
      on the worker's clock); 0 for never.
    index: this worker's index tensor; default `worker_index()`.
    period: > 0 moves the stragglers: during second t, with
      b = hash(floor(t / period)) mod num_workers on every worker's clock,
      workers b, b + 1, ... (mod num_workers) are slow at the slowdowns
      `stragglers` lists, in the order of its indices (which then only
      say how many and in which order).
    num_workers: workers the moving stragglers are drawn from.
    stop_file: the stragglers recover once this file exists (checked per
      batch); "" for never.
  """
  stragglers = dict(stragglers or {})
  stragglers_lib.validate(stragglers)
  if step_ms < 0:
    raise ValueError(f"Received: step_ms={step_ms}, which must be >= 0.")
  if period > 0 and len(stragglers) > num_workers:
    raise ValueError(f"Received: stragglers={stragglers} with period="
                     f"{period}; more moving stragglers than the "
                     f"{num_workers} workers.")
  if step_ms > 0:
    dataset = dataset.apply(compat.data_sleep(int(step_ms * 1000)))
  # One extra-sleep stream per distinct slowdown; stream 0 sleeps nothing.
  extra_us = {i: int(step_ms * (s - 1.0) * 1000)
              for i, s in stragglers.items()}
  extras = sorted(set(extra_us.values()) - {0})
  if extras:
    if index is None:
      index = worker_index()
    index = tf.cast(index, tf.int64)
    stream = {i: extras.index(us) + 1 if us else 0
              for i, us in extra_us.items()}
    if period > 0:
      # The j-th straggler (by index) is worker base + j this period.
      streams = [stream[i] for i in sorted(stream)]
    else:
      # Worker i's stream, for i up to the highest index named (others: 0).
      streams = [stream.get(i, 0) for i in range(max(stream) + 1)]
    table = tf.constant(streams, tf.int64)

    def stream_now(_):
      now = tf.timestamp()
      if period > 0:
        # Knuth's multiplicative hash of the period number: a different,
        # clock-synchronised draw per period on every worker.
        epoch = tf.cast(tf.floor(now / period), tf.int64)
        base = tf.math.floormod(epoch * 2654435761, num_workers)
        position = tf.where(index >= 0,
                            tf.math.floormod(index - base, num_workers),
                            tf.constant(-1, tf.int64))
      else:
        position = index
      named = tf.logical_and(position >= 0, position < len(streams))
      mine = tf.where(named, tf.gather(table, tf.clip_by_value(
          position, 0, len(streams) - 1)), tf.constant(0, tf.int64))
      still = tf.constant(True) if not until else now < until
      if stop_file:
        still = tf.logical_and(
            still, tf.equal(tf.size(tf.io.matching_files(stop_file)), 0))
      return tf.where(still, mine, tf.constant(0, tf.int64))

    # The extra sleep sits in a stream that is only pulled from while the
    # worker is slow: the sleep op's duration is fixed when the iterator is
    # built, but a choice made per batch can end it.
    endless = tf.data.Dataset.range(2**62)
    ticks = tf.data.Dataset.choose_from_datasets(
        [endless] + [endless.apply(compat.data_sleep(us)) for us in extras],
        endless.map(stream_now))
    dataset = tf.data.Dataset.zip((dataset, ticks)).map(lambda d, _: d)
  # One batch ahead and no more: tf.data would otherwise inject its own
  # autotuned prefetch, letting a straggler bank a burst of batches.
  options = tf.data.Options()
  options.experimental_optimization.inject_prefetch = False
  # No autotuning either: every buffer here is fixed, so it tunes nothing,
  # and deleting an autotuned iterator, which `fit` does as it returns,
  # waited for the autotune thread's next timed wake-up (tens of seconds;
  # `compat.disable_device_autotune` does the same for the per-device
  # datasets that both strategies add after this one).
  options.autotune.enabled = False
  return dataset.prefetch(1).with_options(options)
