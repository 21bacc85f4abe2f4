"""`GBAStrategy`: Global Batch gradients Aggregation over a parameter server.

The public class is thin; the work is in `_GBAStrategyExtended` and the
helper modules (`tokens`, `accumulator`, `staleness`, `counters`).
"""

import contextlib
import os
from typing import Any, Dict, Optional

import tensorflow as tf

from gba_tf import accumulator as accumulator_lib
from gba_tf import compat
from gba_tf import config as config_lib
from gba_tf import counters as counters_lib
from gba_tf import tokens as tokens_lib

# Device of the GBA state (global step, counters, lock): the first PS task.
# One task owns the lock so that a push is one lock round trip, whatever the
# number of shards.
_STATE_DEVICE = "/job:ps/replica:0/task:0/device:CPU:0"


class GBAStrategy(compat.ParameterServerStrategyV2):
  """Parameter-server training with the synchronous global batch (GBA).

  GBA (arXiv 2205.11048) trains like asynchronous parameter-server training,
  with no worker ever waiting for another, but applies each optimizer step
  with the *global batch* of synchronous training: the parameter servers
  aggregate exactly `M = global_batch_size / local_batch_size` local
  gradients, from whichever workers deliver them, and apply their average.
  Each gradient carries the global step its worker read before the forward
  pass (its token); gradients more than `staleness_threshold` steps stale are
  decayed, and past `max_staleness` dropped. Hyper-parameters tuned for
  synchronous training (learning rate and its schedule, epochs) carry over
  unchanged: `optimizer.iterations` counts global steps, as in sync.

  Keras usage (the chief; workers and PS run plain `tf.distribute.Server`s):

  ```python
  import gba_tf  # sets TF_USE_LEGACY_KERAS=1 before TensorFlow loads
  import tensorflow as tf

  config = gba_tf.GBAConfig(global_batch_size=1024, local_batch_size=256)
  strategy = gba_tf.GBAStrategy(config=config)  # cluster from TF_CONFIG
  with strategy.scope():
    model = tf.keras.Sequential([...])
    model.compile(tf.keras.optimizers.Adam(1e-3), "binary_crossentropy")

  def dataset_fn(input_context):
    return make_dataset().batch(config.local_batch_size).repeat()

  model.fit(tf.keras.utils.experimental.DatasetCreator(dataset_fn),
            epochs=2, steps_per_epoch=1000,   # local steps per epoch
            callbacks=[gba_tf.callbacks.GBAMetrics(strategy)])
  ```

  `steps_per_epoch` counts *local* steps (one local batch each); an epoch of
  `S` local steps applies `S / M` optimizer steps, as many as synchronous
  training with the global batch over the same samples.

  Custom training loop:

  ```python
  coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
  with strategy.scope():
    model, optimizer = ..., tf.keras.optimizers.SGD(0.1)

  @tf.function
  def step(iterator):
    def replica_fn(x, y):
      with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x))
      grads = tape.gradient(loss, model.trainable_variables)
      optimizer.apply_gradients(zip(grads, model.trainable_variables))
      return loss
    return strategy.run(replica_fn, args=next(iterator))

  per_worker = coordinator.create_per_worker_dataset(dataset_fn)
  for _ in range(num_local_steps):
    coordinator.schedule(step, args=(iter(per_worker),))
  coordinator.join()
  print(strategy.gba_metrics())
  ```

  Cluster (TF_CONFIG on each task; index varies per task):

  ```json
  {"cluster": {"chief": ["host0:2222"],
               "worker": ["host1:2222", "host2:2222"],
               "ps": ["host3:2222", "host4:2222"]},
   "task": {"type": "worker", "index": 0}}
  ```

  Worker and PS tasks only start a server:

  ```python
  resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  server = tf.distribute.Server(resolver.cluster_spec(),
                                job_name=resolver.task_type,
                                task_index=resolver.task_id,
                                protocol=resolver.rpc_layer or "grpc",
                                start=True)
  server.join()
  ```

  `gba_tf.launch.local_cluster.LocalCluster` starts such a cluster on
  loopback ports.

  Sync fallback and switching: with a healthy cluster, the same model and
  `GBAConfig` train under `tf.distribute.MultiWorkerMirroredStrategy` with
  per-replica batch `global_batch_size / num_workers` and the same learning
  rate, schedule and number of optimizer steps. Checkpoints of model and
  optimizer (`gba_tf.checkpoints`) load exactly in both directions, slots of
  sharded embeddings included. `gba-train --mode=auto` starts in sync,
  moves to GBA when `gba_tf.switching.HealthMonitor` sees stragglers for a
  window of checks, and back when the cluster is healthy again
  (`gba_tf.switching`; `gba-launch` restarts the tasks):

  ```sh
  gba-launch --flagfile=configs/local_gba.cfg \
      --mode=auto --straggler=1:4 --straggler_seconds=30
  ```

  Presets: `GBAConfig.preset("async" | "sync_ps" | "backup_workers" |
  "bounded_staleness", ...)` express the classic PS baselines with the same
  machinery.

  Limitations:
    * One device per worker (CPU, or one GPU): multi-GPU workers are refused.
    * Gradients pending in the accumulator (fewer than M) when training stops
      are counted in `gba_metrics()["pending"]` and not applied; they are not
      part of checkpoints.
    * Only tf_keras optimizers (new and legacy) are intercepted; a custom
      loop that updates variables itself (`var.assign_sub`) bypasses GBA.
      Keras 3 optimizers and unknown optimizer merge functions are refused
      with a ValueError. Legacy optimizers lose slots of sharded variables
      in checkpoints; prefer the new ones.
    * Each optimizer's learning-rate schedule, clipping (`clipnorm`,
      `global_clipnorm`, `clipvalue`), decoupled weight decay and variable
      constraints run once per global step, inside the apply, on the
      aggregated gradient: as one process training on the global batch
      (README, "Optimizer features under GBA").
    * A local gradient holding a NaN or Inf is rejected before aggregation
      and counted in `gba_metrics()["nonfinite"]`; TF1
      `tf.compat.v1.train.Optimizer`s are refused with a ValueError.
    * Pushes serialize only on scalar bookkeeping on the first PS task (a
      ticket from a queue, a landing count); gradients are added and
      applied on each shard's own PS task, in parallel across shards
      (`gba_tf.accumulator`, docs/design.md section 3). Global steps are
      applied by one long-running function on the parameter servers,
      started from the chief the first time a step is traced
      (`gba_tf.applier`, a thread named "gba-applier" waits for it). The
      cost against plain ParameterServerStrategy is measured in README
      "Results".
    * A worker killed in the middle of a push leaves the schedule waiting
      for a landing or an apply that will never come; after
      `aggregator.stall_seconds` (30 s) without progress the chief re-issues
      the dead push's ticket or runs its apply (`gba_tf.stall`), and counts
      its gradient in `gba_metrics()["lost"]` if it had been counted.
    * Building a `GBAStrategy` turns tf.data autotuning off in the
      per-device datasets TF adds to every distributed iterator in the
      process (`gba_tf.compat.disable_device_autotune`): with it on, `fit`
      returned up to a minute after training ended. Your own input
      pipeline keeps its options (README, "`fit` can return late").
    * Every optimizer called in a local step (e.g. Adagrad for embeddings
      and Adam for the dense tower) joins the same push and applies once
      per global step; a variable updated by two optimizer calls in one
      local step is refused with a ValueError.
  """

  def __init__(self,
               cluster_resolver: Optional[
                   tf.distribute.cluster_resolver.ClusterResolver] = None,
               config: Optional[config_lib.GBAConfig] = None,
               variable_partitioner=None):
    if config is None:
      config = config_lib.GBAConfig()
    if not isinstance(config, config_lib.GBAConfig):
      raise TypeError(f"Received: config={config!r}, which is not a "
                      "gba_tf.GBAConfig.")
    if cluster_resolver is None:
      if not os.environ.get("TF_CONFIG"):
        raise ValueError(
            "Received: cluster_resolver=None and TF_CONFIG is not set; "
            "pass a ClusterResolver or set TF_CONFIG.")
      cluster_resolver = (
          tf.distribute.cluster_resolver.TFConfigClusterResolver())
    # Before any input pipeline is built: the chief builds the workers'
    # per-device datasets, and with autotuning on, `fit` could return tens
    # of seconds after training ended (`compat.disable_device_autotune`).
    compat.disable_device_autotune()
    super().__init__(cluster_resolver, variable_partitioner)
    compat.replace_extended(
        self, _GBAStrategyExtended(self, cluster_resolver,
                                   variable_partitioner, config))

  @property
  def gba_config(self) -> config_lib.GBAConfig:
    return self.extended.gba_config

  def gba_metrics(self) -> Dict[str, Any]:
    """Runtime counters as Python numbers (see `gba_tf.counters`).

    Also `accumulator_bytes`: the size of the gradient accumulation buffers
    on the parameter servers (fixed once every variable has a gradient).
    """
    landed, _, _, _ = self.extended.aggregator.progress()
    metrics = self.extended.counters.as_dict(pending=sum(landed))
    metrics["accumulator_bytes"] = self.extended.aggregator.buffer_bytes
    return metrics


class _GBAStrategyExtended(compat.ParameterServerStrategyV2Extended):
  """Runs each replica function with a token; aggregates its gradients."""

  def __init__(self, container_strategy, cluster_resolver,
               variable_partitioner, config: config_lib.GBAConfig):
    super().__init__(container_strategy, cluster_resolver,
                     variable_partitioner)
    if self._num_gpus_per_worker > 1:
      raise ValueError(
          f"Received: {self._num_gpus_per_worker} GPUs per worker; "
          "GBAStrategy supports one device per worker.")
    self.gba_config = config
    self.tokens = tokens_lib.TokenService(_STATE_DEVICE)
    self.counters = counters_lib.GBACounters(
        self._num_workers, config.num_aggregate, self.tokens.global_step,
        _STATE_DEVICE)
    self.aggregator = accumulator_lib.GradientAggregator(
        self, config.num_aggregate, config.policy, self.tokens,
        self.counters, _STATE_DEVICE, normalize=config.normalize)
    self._update_log = None
    # id(shard) -> (the ShardedVariable it is part of, the shard).
    self._shard_parents = {}

  def _create_variable(self, next_creator, **kwargs):
    var = super()._create_variable(next_creator, **kwargs)
    if isinstance(var, tf.__internal__.distribute.ShardedVariable):
      for shard in var.variables:
        self._shard_parents[id(shard)] = (var, shard)
    return var

  def shard_groups(self, variables):
    """`variables` grouped by the (whole) variable each is a shard of.

    Returns lists of indices into `variables`; an unsharded variable is a
    group of its own. Per-variable clipping (`clipnorm`) must see a sharded
    variable whole, as synchronous training without shards does.
    """
    groups = {}
    for i, var in enumerate(variables):
      parent = self._shard_parents.get(id(var))
      key = id(parent[0]) if parent and parent[1] is var else ("v", i)
      groups.setdefault(key, []).append(i)
    return list(groups.values())

  def _call_for_each_replica(self, fn, args, kwargs):
    self._assert_being_scheduled_by_cluster_coordinator()
    token, read_time = self.tokens.issue()
    context = _GBAReplicaContext(self._container_strategy(), token,
                                 read_time, self.tokens.worker_index())
    # The forward pass depends on the token, so the token is never newer
    # than the parameters it reads (invariant 2).
    try:
      with tf.device(self.worker_devices[0]), context, \
          tf.control_dependencies([token]):
        outputs = fn(*args, **kwargs)
        # One push per local step, after every optimizer has handed over its
        # gradients: they join the same global step.
        context.push()
    finally:
      context.close()
    return outputs

  def _update(self, var, fn, args, kwargs, group):
    result = super()._update(var, fn, args, kwargs, group)
    if self._update_log is not None:
      self._update_log.extend(tf.nest.flatten(result))
    return result

  @contextlib.contextmanager
  def record_updates(self):
    """Collects the result of every `update` call made inside (trace time).

    The aggregator waits for these before it marks a global step applied:
    an optimizer returns only its `iterations` increment, not its variable
    updates.
    """
    outer, self._update_log = self._update_log, []
    try:
      yield self._update_log
    finally:
      self._update_log = outer


class _GBAReplicaContext(compat.ReplicaContext):
  """Replica context that collects the optimizers' gradients for one push.

  A tf_keras optimizer's `apply_gradients` makes up to three merge calls:
  the all-reduce of its local gradients (`aggregate_gradients`, before any
  clipping), decoupled weight decay, and the apply. This context keeps the
  unclipped local gradients from the first, defers the other two, and
  builds one push for the whole local step in `push()`. The optimizer's
  clipping, weight decay, learning-rate schedule, update and variable
  constraints then run once per global step, inside the apply, on the
  aggregated gradient: what one process training on the global batch does.

  Not thread-safe: one per traced replica function.
  """

  def __init__(self, strategy, token, read_time, worker_index):
    super().__init__(strategy, replica_id_in_sync_group=0)
    self._token = token
    self._read_time = read_time
    self._worker_index = worker_index
    self._deferred = []
    self._steps = []
    # id(var) -> (local gradient before clipping, var).
    self._unclipped = {}
    # Constraints taken off the variables while this step is traced.
    self._constraints = []

  def merge_call(self, merge_fn, args=(), kwargs=None):
    # Overrides the public method: `merge_call` wraps `merge_fn` for
    # autograph before `_merge_call` sees it, hiding the bound optimizer.
    kwargs = kwargs or {}
    keras3 = compat.keras3_owner_of_merge_fn(merge_fn)
    if keras3 is not None:
      raise ValueError(
          f"Received: a Keras 3 object ({keras3}) applying gradients; "
          "GBAStrategy aggregates tf_keras optimizers only (import gba_tf "
          "before TensorFlow, or set TF_USE_LEGACY_KERAS=1).")
    if compat.is_gradient_all_reduce_merge_fn(merge_fn):
      # `aggregate_gradients`: with one replica per worker there is nothing
      # to all-reduce; keep the gradients as they are (unclipped) for the
      # push, and hand them back unchanged.
      grads_and_vars = list(args[0])
      for g, v in grads_and_vars:
        self._unclipped[id(v)] = (g, v)
      return [g for g, _ in grads_and_vars]
    if compat.is_weight_decay_merge_fn(merge_fn):
      # Decoupled weight decay is part of the optimizer step: apply it once
      # per global step, inside the apply, not once per local step.
      self._deferred.append((merge_fn, args, kwargs))
      return None
    optimizer = compat.optimizer_of_merge_fn(merge_fn)
    if optimizer is None:
      unsupported = compat.unsupported_optimizer_of_merge_fn(merge_fn)
      if unsupported is not None:
        raise ValueError(
            f"Received: optimizer={type(unsupported).__name__}, a TF1 "
            "tf.compat.v1.train.Optimizer, which GBAStrategy cannot "
            "aggregate; use a tf.keras optimizer (e.g. "
            "tf.keras.optimizers.Adagrad).")
      owner = compat.optimizer_like_owner_of_merge_fn(merge_fn)
      if owner is not None:
        raise ValueError(
            f"Received: {type(owner).__name__}, an optimizer whose merge "
            f"function {getattr(merge_fn, '__name__', merge_fn)!r} "
            "GBAStrategy does not recognize; it would bypass aggregation.")
      # Anything else (e.g. a Keras metric's result) is not an update.
      return super().merge_call(merge_fn, args, kwargs)
    return self._take_optimizer_step(optimizer, merge_fn, args, kwargs)

  def _take_optimizer_step(self, optimizer, merge_fn, args, kwargs):
    """Records one optimizer's part of the push; returns its `iterations`."""
    grads_and_vars = []
    missing = []
    for g, v in args[0]:
      if g is None:
        continue
      unclipped = self._unclipped.pop(id(v), None)
      if unclipped is not None and unclipped[1] is v:
        g = unclipped[0]
      else:
        missing.append(v.name)
      grads_and_vars.append((g, v))
    clipping = compat.clipping_of(optimizer)
    if missing and clipping:
      raise ValueError(
          f"Received: {clipping} on {type(optimizer).__name__} with "
          f"gradients that skipped `aggregate_gradients` ({missing}); "
          "GBAStrategy clips the global-batch gradient and needs the "
          "unclipped local ones (do not pass skip_gradients_aggregation).")
    rest = tuple(args[1:])
    deferred, self._deferred = self._deferred, []
    strategy = self._strategy
    var_list = [v for _, v in grads_and_vars]
    pushed = {id(v) for step in self._steps for _, v in step.grads_and_vars}
    shared = [v.name for v in var_list if id(v) in pushed]
    if shared:
      raise ValueError(
          f"Received: variables {shared} updated by two optimizer calls in "
          "one local step; GBAStrategy applies each variable once per "
          "global step.")
    # The new optimizer projects constraints right after this merge call,
    # in the local step; legacy optimizers do it inside their apply.
    constraints = ([] if compat.is_legacy_optimizer(optimizer)
                   else compat.take_constraints(var_list))
    self._constraints.extend(constraints)

    def apply_fn(aggregated):
      # At the global step, in the order of tf_keras' apply_gradients:
      # learning rate, clipping, weight decay, update, constraints.
      with compat.learning_rate_at_apply(optimizer):
        aggregated = compat.clip_aggregated(
            optimizer, aggregated, strategy.extended.shard_groups(var_list))
        for fn, fn_args, fn_kwargs in deferred:
          fn(strategy, *fn_args, **fn_kwargs)
        # Legacy optimizers computed their step-dependent state
        # (`_prepare`) when the local step started; recompute it here.
        fn = compat.with_fresh_apply_state(merge_fn, optimizer, var_list)
        result = fn(strategy, aggregated, *rest, **kwargs)
        # After the update: tf.function orders ops on one variable in
        # program order (automatic control dependencies), loops included.
        for var, constraint in constraints:
          strategy.extended.update(
              var, lambda v, c=constraint: v.assign(c(v)), group=False)
      return result

    self._steps.append(accumulator_lib.OptimizerStep(grads_and_vars,
                                                     apply_fn))
    return optimizer.iterations

  def push(self):
    """Builds this local step's single push (no-op without gradients)."""
    if self._deferred:
      raise ValueError(
          f"Received: {len(self._deferred)} weight-decay call(s) with no "
          "optimizer apply after them in the local step; GBAStrategy applies "
          "weight decay inside the optimizer's global step.")
    steps, self._steps = self._steps, []
    if not steps:
      return None
    aggregator = self._strategy.extended.aggregator

    def gba_merge(unused_strategy):
      return aggregator.push(steps, self._token, self._read_time,
                             self._worker_index)

    return super().merge_call(gba_merge)

  def close(self):
    """Puts back the constraints taken off while the step was traced."""
    constraints, self._constraints = self._constraints, []
    compat.restore_constraints(constraints)

