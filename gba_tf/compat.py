"""Every use of TensorFlow- and tf_keras-private APIs, in one place.

GBA hooks into parts of TF 2.21 that have no public API: the parameter
server strategy's Extended class, the replica context's merge call, and the
tf_keras optimizer's gradient-apply function. Keeping them here means a TF
upgrade breaks one module, and `tests/compat_test.py` says which hook moved.
"""

import functools
from typing import Any, Optional, Sequence

import tensorflow as tf

# pylint: disable=g-direct-tensorflow-import,unused-import
from tensorflow.python.distribute import distribute_lib
from tensorflow.python.distribute import parameter_server_strategy_v2
from tensorflow.python.distribute.coordinator import cluster_coordinator as _cluster_coordinator
from tensorflow.python.checkpoint import checkpoint_management as _checkpoint_management
from tensorflow.python.data.experimental.ops import testing as _data_testing
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


def refresh_learning_rate(optimizer: Any) -> None:
  """Re-evaluates a LearningRateSchedule at the optimizer's current step.

  The new tf_keras optimizer evaluates its schedule once at the start of
  `apply_gradients`, i.e. when the *local* step starts; GBA applies later, at
  the global step, so the schedule has to be evaluated again there.
  """
  compute = getattr(optimizer, "_compute_current_learning_rate", None)
  if compute is not None:
    compute()


def data_sleep(sleep_microseconds):
  """`tf.data.experimental.sleep`, which TF 2.21 does not export."""
  return _data_testing.sleep(sleep_microseconds)


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
