"""Every use of TensorFlow- and tf_keras-private APIs, in one place.

GBA hooks into parts of TF 2.21 that have no public API: the parameter
server strategy's Extended class, the replica context's merge call, and the
tf_keras optimizer's gradient-apply function. Keeping them here means a TF
upgrade breaks one module, and `tests/compat_test.py` says which hook moved.
"""

import contextlib
import functools
from typing import Any, List, Optional, Sequence, Tuple

import tensorflow as tf

# pylint: disable=g-direct-tensorflow-import,unused-import
from tensorflow.python.distribute import distribute_lib
from tensorflow.python.eager import context as _context
from tensorflow.python.distribute import parameter_server_strategy_v2
from tensorflow.python.distribute.coordinator import cluster_coordinator as _cluster_coordinator
from tensorflow.python.checkpoint import checkpoint_management as _checkpoint_management
from tensorflow.python.data.experimental.ops import data_service_ops as _data_service_ops
from tensorflow.python.data.experimental.ops import testing as _data_testing
from tensorflow.python.data.ops import multi_device_iterator_ops as _multi_device_iterator_ops
from tensorflow.python.framework import ops
# pylint: enable=g-direct-tensorflow-import,unused-import

ReplicaContext = distribute_lib.ReplicaContext
ParameterServerStrategyV2 = parameter_server_strategy_v2.ParameterServerStrategyV2
ParameterServerStrategyV2Extended = (
    parameter_server_strategy_v2.ParameterServerStrategyV2Extended)

# Names of the functions tf_keras optimizers hand to `merge_call`: the new
# optimizer (`tf_keras.optimizers.Optimizer`) and the legacy `optimizer_v2`.
_APPLY_GRADIENTS_MERGE_FNS = ("_distributed_apply_gradients_fn",
                              "_distributed_apply")
# tf_keras' decoupled weight decay (AdamW, `weight_decay=`) merge function.
_WEIGHT_DECAY_MERGE_FN = "distributed_apply_weight_decay"
# The merge function of tf_keras' `optimizer.aggregate_gradients` (new and
# legacy optimizers): it receives the local gradients before any clipping.
_ALL_REDUCE_MERGE_FN = ("tf_keras.src.optimizers.utils", "_all_reduce_sum_fn")


def _unwrap_partials(merge_fn: Any) -> Any:
  """The function under any `functools.partial` layers (legacy optimizers)."""
  while isinstance(merge_fn, functools.partial):
    merge_fn = merge_fn.func
  return merge_fn


def optimizer_of_merge_fn(merge_fn: Any) -> Optional[Any]:
  """The optimizer whose gradient-apply function `merge_fn` is, else None.

  tf_keras optimizers apply gradients by passing a bound method to
  `ReplicaContext.merge_call` (the legacy optimizer wraps it in a
  `functools.partial` carrying `apply_state`); that call is where GBA takes
  over.
  """
  merge_fn = _unwrap_partials(merge_fn)
  if getattr(merge_fn, "__name__", None) not in _APPLY_GRADIENTS_MERGE_FNS:
    return None
  optimizer = getattr(merge_fn, "__self__", None)
  if optimizer is None or not hasattr(optimizer, "iterations"):
    return None
  return optimizer


def unsupported_optimizer_of_merge_fn(merge_fn: Any) -> Optional[Any]:
  """A TF1 `tf.compat.v1.train.Optimizer` applying gradients, else None.

  Those apply through their own `_distributed_apply` merge function, which
  GBA does not aggregate: they would silently train asynchronously.
  """
  optimizer = getattr(_unwrap_partials(merge_fn), "__self__", None)
  if isinstance(optimizer, tf.compat.v1.train.Optimizer):
    return optimizer
  return None


def is_gradient_all_reduce_merge_fn(merge_fn: Any) -> bool:
  """Whether `merge_fn` is tf_keras' all-reduce of the local gradients."""
  merge_fn = _unwrap_partials(merge_fn)
  return (getattr(merge_fn, "__module__", None),
          getattr(merge_fn, "__name__", None)) == _ALL_REDUCE_MERGE_FN


def keras3_owner_of_merge_fn(merge_fn: Any) -> Optional[str]:
  """The Keras 3 object behind `merge_fn`, by name, else None.

  Keras 3 optimizers (package `keras`) apply through merge functions of
  their own; GBA aggregates tf_keras optimizers only.
  """
  merge_fn = _unwrap_partials(merge_fn)
  owner = getattr(merge_fn, "__self__", None)
  module = (type(owner).__module__ if owner is not None
            else getattr(merge_fn, "__module__", "")) or ""
  if module == "keras" or module.startswith("keras."):
    return (type(owner).__name__ if owner is not None
            else getattr(merge_fn, "__qualname__", repr(merge_fn)))
  return None


def optimizer_like_owner_of_merge_fn(merge_fn: Any) -> Optional[Any]:
  """An object with `apply_gradients` whose method `merge_fn` is, else None.

  Such a merge function applies gradients in a way GBA does not know; it
  would bypass aggregation, so the caller refuses it.
  """
  owner = getattr(_unwrap_partials(merge_fn), "__self__", None)
  if owner is not None and hasattr(owner, "apply_gradients"):
    return owner
  return None


def is_legacy_optimizer(optimizer: Any) -> bool:
  """Whether `optimizer` is a tf_keras legacy `optimizer_v2` optimizer."""
  return isinstance(optimizer, tf.keras.optimizers.legacy.Optimizer)


def clipping_of(optimizer: Any) -> Optional[str]:
  """The optimizer's gradient clipping as `name=value`, else None."""
  for name in ("clipnorm", "global_clipnorm", "clipvalue"):
    value = getattr(optimizer, name, None)
    if value:
      return f"{name}={value}"
  if getattr(optimizer, "gradient_transformers", None):
    return "gradient_transformers"
  return None


def clip_aggregated(optimizer: Any, grads_and_vars: Sequence[Tuple[Any, Any]],
                    groups: Sequence[Sequence[int]]) -> List[Any]:
  """The optimizer's clipping, on the aggregated (global-batch) gradients.

  What `apply_gradients` does after `aggregate_gradients`: `_clip_gradients`
  in the new optimizer; `_transform_gradients` (clipping, then
  `gradient_transformers`) in the legacy one. One change: `clipnorm` clips
  each *whole* variable by its norm, `groups` (lists of indices) naming the
  shards of one variable, as unsharded synchronous training does; tf_keras
  would clip each shard of a sharded variable by the shard's own norm.
  """
  grads_and_vars = list(grads_and_vars)
  legacy = is_legacy_optimizer(optimizer)
  if not getattr(optimizer, "clipnorm", None):
    if legacy:
      return list(optimizer._transform_gradients(grads_and_vars))  # pylint: disable=protected-access
    grads = optimizer._clip_gradients([g for g, _ in grads_and_vars])  # pylint: disable=protected-access
    return list(zip(grads, [v for _, v in grads_and_vars]))
  if legacy and optimizer.clipvalue is not None:
    grads_and_vars = list(optimizer._clipvalue_fn(grads_and_vars))  # pylint: disable=protected-access
  grads = [g for g, _ in grads_and_vars]
  for group in groups:
    clipped, _ = tf.clip_by_global_norm([grads[i] for i in group],
                                        optimizer.clipnorm)
    for i, g in zip(group, clipped):
      grads[i] = g
  clipped = list(zip(grads, [v for _, v in grads_and_vars]))
  for transform in (getattr(optimizer, "gradient_transformers", None)
                    if legacy else None) or []:
    clipped = list(transform(clipped))
  return clipped


@contextlib.contextmanager
def learning_rate_at_apply(optimizer: Any):
  """Makes the new optimizer's update read its rate once, at the global step.

  A new tf_keras optimizer with a `LearningRateSchedule` keeps the current
  rate in a variable that every local `apply_gradients` writes, outside any
  lock; an update reading that variable could see a rate another worker
  computed at an older step. Inside this context, `optimizer.learning_rate`
  is instead a tensor computed here from `iterations` (the global step); the
  variable is still written, for callbacks and checkpoints. A constant rate
  (a variable a callback may assign) is read once here, on its own task,
  instead of once per updated variable. Legacy optimizers pass through
  (their `_prepare` is computed at apply time by `with_fresh_apply_state`).
  """
  schedule = getattr(optimizer, "_learning_rate", None)
  if (not is_legacy_optimizer(optimizer)
      and isinstance(schedule, tf.Variable)):
    # A constant rate is a variable that every variable's update reads. One
    # read per global step, on the variable's task, is what the updates see
    # instead: across tasks each read is a RecvTensor RPC, paid on every
    # push even when the push does not apply (the apply is a branch of it).
    # Still read at the apply, so a callback's change takes effect as in
    # synchronous training.
    with tf.device(schedule.device):
      rate = schedule.read_value()
    object.__setattr__(optimizer, "_learning_rate", rate)
    try:
      yield
    finally:
      object.__setattr__(optimizer, "_learning_rate", schedule)
    return
  if (is_legacy_optimizer(optimizer) or not isinstance(
      schedule, tf.keras.optimizers.schedules.LearningRateSchedule)
      or not hasattr(optimizer, "_current_learning_rate")):
    yield
    return
  variable = optimizer._current_learning_rate  # pylint: disable=protected-access
  rate = tf.cast(schedule(optimizer.iterations), variable.dtype)
  variable.assign(rate)
  # object.__setattr__: a tensor must not replace the variable in the
  # optimizer's checkpoint dependencies.
  object.__setattr__(optimizer, "_current_learning_rate", rate)
  try:
    yield
  finally:
    object.__setattr__(optimizer, "_current_learning_rate", variable)


def take_constraints(variables: Sequence[Any]) -> List[Tuple[Any, Any]]:
  """Removes the variables' constraints for now; returns what to restore.

  The new tf_keras optimizer projects each variable (`constraint(var)`) in
  the local step, right after its update; under GBA that would be a
  read-project-write on every local step, racing other workers' applies.
  GBA takes the constraints off while the local step is traced and applies
  them inside the global step's apply instead; `restore_constraints` puts
  them back.
  """
  taken = []
  for var in variables:
    # PS variables come wrapped (e.g. ps_values.CachingVariable), whose
    # `constraint` reads the wrapped variable's.
    while "_v" in vars(var):
      var = var._v  # pylint: disable=protected-access
    constraint = getattr(var, "_constraint", None)
    if constraint is not None:
      taken.append((var, constraint))
      var._constraint = None  # pylint: disable=protected-access
  return taken


def restore_constraints(taken: Sequence[Tuple[Any, Any]]) -> None:
  for var, constraint in taken:
    var._constraint = constraint  # pylint: disable=protected-access


def with_fresh_apply_state(merge_fn: Any, optimizer: Any,
                           var_list: Sequence[Any]) -> Any:
  """`merge_fn` with a legacy optimizer's `apply_state` computed now.

  The legacy `optimizer_v2.apply_gradients` computes `_prepare(var_list)`
  (learning rate, Adam's bias correction, `decay=`) when the local step
  starts and binds it into the merge function; GBA applies at the global
  step, so it is computed again there. New optimizers pass through.
  """
  if (isinstance(merge_fn, functools.partial)
      and "apply_state" in (merge_fn.keywords or {})):
    keywords = dict(merge_fn.keywords)
    keywords["apply_state"] = optimizer._prepare(list(var_list))  # pylint: disable=protected-access
    return functools.partial(merge_fn.func, *merge_fn.args, **keywords)
  return merge_fn


def is_weight_decay_merge_fn(merge_fn: Any) -> bool:
  return getattr(merge_fn, "__name__", None) == _WEIGHT_DECAY_MERGE_FN


def data_sleep(sleep_microseconds):
  """`tf.data.experimental.sleep`, which TF 2.21 does not export."""
  return _data_testing.sleep(sleep_microseconds)


def forget_data_service_functions() -> None:
  """Makes the next tf.data service dataset trace its own functions.

  TF 2.21 caches the service dataset's `uncompress` function per element
  spec, across traces. A dataset function traced for remote workers after
  an earlier one (eager, or another trace) with the same spec refers to the
  cached function without adding it to its own library, and the workers
  fail with "Could not find required function definition
  __inference_DataServiceDataset_uncompress_lambda_N".
  """
  _data_service_ops._get_uncompress_func.cache_clear()  # pylint: disable=protected-access


def replace_extended(strategy: Any, extended: Any) -> None:
  """Swaps the Extended object of an initialised strategy.

  `ParameterServerStrategyV2.__init__` hard-codes its Extended class and also
  connects to the cluster; running it and then swapping keeps that logic in
  one place (TF's) instead of copying it.
  """
  extended._retrace_functions_for_each_device = (  # pylint: disable=protected-access
      strategy.extended._retrace_functions_for_each_device)  # pylint: disable=protected-access
  strategy._extended = extended  # pylint: disable=protected-access


def inside_function() -> bool:
  return ops.inside_function()


def disable_get_next_as_optional(strategy: Any) -> None:
  """Makes MultiWorkerMirroredStrategy's input iterators skip a barrier.

  By default every `get_next` all-reduces "has data" across workers, so that
  a finite dataset ends on all workers at once. That barrier makes each
  worker wait for the slowest worker's input pipeline *before* computing,
  which hides who is slow. Only for datasets that repeat forever.
  """
  strategy.extended.experimental_enable_get_next_as_optional = False


def disable_device_autotune() -> None:
  """Builds MultiDeviceIterator's per-device datasets without autotuning.

  MultiWorkerMirroredStrategy and ParameterServerStrategy (whose workers'
  iterators the chief builds) both feed through MultiDeviceIterators, whose
  per-device datasets (a generator and a fixed prefetch that TF builds)
  take default options, autotuning included. Deleting their iterators,
  which `fit` does as it returns, joins the autotune thread, and the join
  waited for that thread's next timed wake-up, not for a cancellation: gdb
  showed the main thread in `RootDataset::Iterator::~Iterator` and the
  thread in `Model::OptimizeLoop`. `fit` returned up to 37 s (4-worker
  MovieLens job, sync) and 61 s (throughput benchmark, 4 workers + 2 PS)
  after training ended; with this and the input pipeline's own autotuning
  off (`synthetic.with_straggler`), within 0.2 s (README "`fit` can return
  late"). `GBAStrategy` calls it when built. Idempotent; affects
  iterators built after the call.
  """
  create = _multi_device_iterator_ops._create_device_dataset  # pylint: disable=protected-access
  if getattr(create, "gba_tf_no_autotune", False):
    return

  @functools.wraps(create)
  def create_without_autotune(*args, **kwargs):
    options = tf.data.Options()
    options.autotune.enabled = False
    return create(*args, **kwargs).with_options(options)

  create_without_autotune.gba_tf_no_autotune = True
  _multi_device_iterator_ops._create_device_dataset = create_without_autotune  # pylint: disable=protected-access


def is_ps_failure(error: BaseException) -> bool:
  """Whether ClusterCoordinator would call `error` a lost parameter server."""
  return _cluster_coordinator._is_ps_failure(error)  # pylint: disable=protected-access


def update_checkpoint_state(directory: str, latest: str,
                            kept: Sequence[str]) -> None:
  """Rewrites `directory`'s `checkpoint` file, with relative paths.

  The public `tf.compat.v1.train.update_checkpoint_state` is deprecated
  (and warns) in favour of `tf.train.CheckpointManager`, which
  `gba_tf.checkpoints.CheckpointManager` cannot use: it saves eagerly.
  The file is written atomically (temporary file, then rename).
  """
  _checkpoint_management.update_checkpoint_state_internal(
      save_dir=directory, model_checkpoint_path=latest,
      all_model_checkpoint_paths=list(kept), save_relative_paths=True)


def current_server_def() -> Any:
  """The eager context's cluster definition (a new object on every connect).

  A thread that issues remote ops must stop once this changes: TF 2.21
  segfaults on a remote op whose handles belong to a cluster the context
  has left.
  """
  return _context.context()._server_def  # pylint: disable=protected-access
