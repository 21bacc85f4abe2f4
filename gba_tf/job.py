"""The training job behind `scripts/train.py`: one program, every task and mode.

Every task of a cluster runs the same binary; TF_CONFIG gives its role:

| mode        | chief                         | worker                 | ps     |
|-------------|-------------------------------|------------------------|--------|
| gba / async | coordinates `model.fit`       | `tf.distribute.Server` | Server |
| sync        | (optional) a replica, as below| MultiWorkerMirrored replica | -  |

In sync mode the chief's duties (writing checkpoints, the switch state and
the results) fall to worker 0 when the cluster has no chief.

The same `JobConfig` means the same optimization in every mode (docs/design.md,
invariant 5): `train_steps` optimizer steps of `global_batch_size` samples
each. Sync splits the global batch evenly over the workers; GBA aggregates
`M = global / local` local gradients per step and runs `M * train_steps`
local steps; async applies each of those local steps on its own.
"""

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, Optional

from absl import logging

import numpy as np
import tensorflow as tf

from gba_tf import callbacks as gba_callbacks
from gba_tf import checkpoints
from gba_tf import compat
from gba_tf import cluster as cluster_lib
from gba_tf import config as config_lib
from gba_tf import export as export_lib
from gba_tf import flags as gba_flags
from gba_tf import health
from gba_tf import models
from gba_tf import strategy as strategy_lib
from gba_tf import switching
from gba_tf.data import movielens
from gba_tf.data import synthetic

_OPTIMIZERS = {
    "adagrad": tf.keras.optimizers.Adagrad,
    "adam": tf.keras.optimizers.Adam,
    "sgd": tf.keras.optimizers.SGD,
}
# Held-out examples scored per model call in evaluations.
_EVAL_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class JobConfig:
  """Everything one training job needs, resolved from flags and TF_CONFIG.

  Attributes mirror the flags of `gba_tf.flags.define_flags` (see their
  help); `mode` is the mode this process runs ("auto" already resolved to
  "sync" or "gba"), `auto` whether switching is on, `global_batch_size` the
  synchronous global batch that fixes the samples per optimizer step, and
  `gba` the resolved `GBAConfig` of the PS modes (its own global batch
  differs only for the backup-workers and bounded-staleness baselines).
  """
  mode: str
  auto: bool
  model_dir: str
  num_workers: int
  num_ps: int
  global_batch_size: int
  gba: config_lib.GBAConfig
  train_steps: int
  steps_per_loop: int
  optimizer: str
  learning_rate: float
  model: str
  dataset: str
  embedding_dim: int
  train_examples: int
  test_examples: int
  eval_examples: int
  checkpoint_every_loop: bool
  export_dir: Optional[str]
  seed: int
  step_ms: float
  slow_worker: int
  slowdown: float
  straggler_until: float
  straggler_stop_file: str
  straggler_period: int
  inject_nonfinite_worker: int
  health_check_steps: int
  health_window: int
  health_slow_ratio: float

  @property
  def local_batch_size(self) -> int:
    return self.gba.local_batch_size

  @property
  def local_steps_per_step(self) -> int:
    """Local batches in one synchronous global batch."""
    return self.global_batch_size // self.local_batch_size

  @property
  def num_aggregate(self) -> int:
    """Local steps per optimizer step of this PS mode (async: 1)."""
    return 1 if self.mode == "async" else self.gba.num_aggregate

  def to_dict(self) -> Dict[str, Any]:
    out = dataclasses.asdict(self)
    out["gba"] = self.gba.get_config()
    return out


def _positive(name: str, value) -> None:
  if value is None or value <= 0:
    raise ValueError(f"Received: --{name}={value}, which must be > 0.")


def config_from_flags(task: cluster_lib.TaskConfig,
                      mode: str) -> JobConfig:
  """Validates the flags against TF_CONFIG; raises ValueError naming a value."""
  f = gba_flags.FLAGS
  for name in ("workers", "local_batch_size", "train_steps",
               "steps_per_loop", "learning_rate", "embedding_dim",
               "train_examples", "test_examples", "health_check_steps",
               "health_window", "health_slow_ratio"):
    _positive(name, f[name].value)
  if f.eval_examples < 0:
    raise ValueError(f"Received: --eval_examples={f.eval_examples}, which "
                     "must be >= 0.")
  if f.ps < 0:
    raise ValueError(f"Received: --ps={f.ps}, which must be >= 0.")
  if f.step_ms < 0:
    raise ValueError(f"Received: --step_ms={f.step_ms}, which must be >= 0.")
  slow_worker, slowdown = gba_flags.parse_straggler(f.straggler)
  if f["backup"].present:
    logging.warning("--backup is deprecated; it is an alias of "
                    "--checkpoint_every_loop.")
  workers = f.workers
  if task.task_type is not None:
    in_cluster = task.num_workers + (
        len(task.cluster.get("chief", [])) if mode == "sync" else 0)
    if f["workers"].present and f.workers != in_cluster:
      raise ValueError(f"Received: --workers={f.workers}, but TF_CONFIG has "
                       f"{in_cluster} worker task(s).")
    workers = in_cluster
  elif mode != "sync":
    raise ValueError(f"Received: --mode={mode} without TF_CONFIG.")
  else:
    workers = 1
  if f.straggler_period < 0:
    raise ValueError(f"Received: --straggler_period={f.straggler_period}, "
                     "which must be >= 0.")
  if f.inject_nonfinite_worker >= workers:
    raise ValueError(f"Received: --inject_nonfinite_worker="
                     f"{f.inject_nonfinite_worker}, but there are only "
                     f"{workers} workers.")
  if slow_worker >= workers:
    raise ValueError(f"Received: --straggler={f.straggler}, but there are "
                     f"only {workers} workers.")
  global_batch = gba_flags.global_batch_from_flags(workers)
  if global_batch % f.local_batch_size:
    raise ValueError(
        f"Received: global_batch_size={global_batch}, which is not a "
        f"multiple of local_batch_size={f.local_batch_size}.")
  gba_config = gba_flags.gba_config_from_flags(num_workers=workers)
  if mode == "sync" and global_batch % workers:
    raise ValueError(
        f"Received: global_batch_size={global_batch}, which is not a "
        f"multiple of the {workers} sync workers.")
  if f.export_dir:
    export_lib.check_export_dir(f.export_dir)
  model_dir = f.model_dir or tempfile.mkdtemp(prefix="gba_train_")
  return JobConfig(
      mode=mode, auto=f.mode == "auto", model_dir=model_dir,
      num_workers=workers, num_ps=len(task.cluster.get("ps", [])),
      global_batch_size=global_batch, gba=gba_config,
      train_steps=f.train_steps, steps_per_loop=f.steps_per_loop,
      optimizer=f.optimizer, learning_rate=f.learning_rate, model=f.model,
      dataset=f.dataset, embedding_dim=f.embedding_dim,
      train_examples=f.train_examples, test_examples=f.test_examples,
      eval_examples=f.eval_examples,
      checkpoint_every_loop=f.checkpoint_every_loop,
      export_dir=f.export_dir, seed=f.seed, step_ms=f.step_ms,
      slow_worker=slow_worker, slowdown=slowdown, straggler_until=f.straggler_until,
      straggler_stop_file=f.straggler_stop_file,
      straggler_period=f.straggler_period,
      inject_nonfinite_worker=f.inject_nonfinite_worker,
      health_check_steps=f.health_check_steps,
      health_window=f.health_window,
      health_slow_ratio=f.health_slow_ratio)


class _StopAfterBatches(tf.keras.callbacks.Callback):
  """Stops `fit` after exactly `total` batches, counted across epochs.

  Counting from the epoch number keeps the total right whatever epoch
  `fit` starts from.
  """

  def __init__(self, total: int, steps_per_epoch: int):
    super().__init__()
    # Reads no logs: allowed as a batch-level callback under PSS.
    self._supports_tf_logs = True
    self.total = total
    self.steps_per_epoch = steps_per_epoch
    self._epoch = 0

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    if self._epoch * self.steps_per_epoch + batch + 1 >= self.total:
      self.model.stop_training = True


def _log(message: str) -> None:
  print(message, flush=True)


@dataclasses.dataclass(frozen=True)
class _Data:
  train_ids: np.ndarray
  train_labels: np.ndarray
  test_ids: np.ndarray
  test_labels: np.ndarray
  num_fields: int
  vocab_size: int
  best_auc: Optional[float]  # known for synthetic data only


def load_data(config: JobConfig) -> _Data:
  """The job's train / test data (deterministic by `config.seed`)."""
  if config.dataset == "movielens":
    ml = movielens.load(seed=config.seed)
    data = _Data(ml.train_ids, ml.train_labels, ml.test_ids[
        :config.test_examples], ml.test_labels[:config.test_examples],
                 ml.num_fields, ml.vocab_size, None)
  else:
    gen = synthetic.SyntheticCTR(seed=config.seed)
    train_ids, train_labels = gen.sample(config.train_examples, seed=1)
    test_ids, test_labels = gen.sample(config.test_examples, seed=3)
    data = _Data(train_ids, train_labels, test_ids, test_labels,
                 gen.num_fields, gen.vocab_size, gen.best_auc())
  for ids, labels in ((data.train_ids, data.train_labels),
                      (data.test_ids, data.test_labels)):
    synthetic.validate_examples(ids, labels, data.num_fields,
                                data.vocab_size)
  return data


def _scores(model, ids: np.ndarray) -> np.ndarray:
  """Logits of `model` in batches, outside any replica context."""
  return np.concatenate([
      model(ids[i:i + _EVAL_BATCH], training=False).numpy().ravel()
      for i in range(0, len(ids), _EVAL_BATCH)])


def _logloss(labels: np.ndarray, logits: np.ndarray) -> float:
  prob = np.clip(1.0 / (1.0 + np.exp(-logits)), 1e-7, 1 - 1e-7)
  return float(-np.mean(labels * np.log(prob) +
                        (1 - labels) * np.log(1 - prob)))


class _Progress(tf.keras.callbacks.Callback):
  """Per-loop timing and, optionally, held-out AUC (AUC-vs-samples plots).

  Runs on the chief only. Keras ends an epoch after joining its steps, so
  evaluation time is idle time for the workers: it is measured apart
  (`eval_seconds`), not counted as training time. The first loop includes
  tracing and warm-up; `steady_samples_per_s` leaves it out.
  """

  def __init__(self, ids, labels, samples_at_epoch_end):
    super().__init__()
    self._ids, self._labels = ids, labels
    self._samples = samples_at_epoch_end
    self.points = []
    self.loops = []  # (samples, training seconds) per loop
    self.seconds = 0.0
    self._begin = None

  def on_train_begin(self, logs=None):
    # The starting point of the curve (the restored step, if any).
    if self._ids is not None:
      self._evaluate(self._samples(-1))

  def on_epoch_begin(self, epoch, logs=None):
    self._begin = time.perf_counter()

  def _evaluate(self, samples):
    start = time.perf_counter()
    logits = _scores(self.model, self._ids)
    self.points.append({
        "optimizer_steps": int(self.model.optimizer.iterations.numpy()),
        "samples": samples,
        "auc": synthetic.auc(self._labels, logits),
        "logloss": _logloss(self._labels, logits)})
    self.seconds += time.perf_counter() - start

  def on_epoch_end(self, epoch, logs=None):
    samples = self._samples(epoch)
    previous = self._samples(epoch - 1)
    self.loops.append((samples - previous, time.perf_counter() - self._begin))
    if self._ids is not None:
      self._evaluate(samples)

  def steady_samples_per_s(self) -> Optional[float]:
    steady = self.loops[1:]
    seconds = sum(t for _, t in steady)
    return sum(n for n, _ in steady) / seconds if seconds else None


class Job:
  """One process of a training job. Not thread-safe."""

  def __init__(self, config: JobConfig, task: cluster_lib.TaskConfig):
    self.config = config
    self.task = task
    self._data = None

  @property
  def data(self) -> _Data:
    if self._data is None:
      self._data = load_data(self.config)
    return self._data

  # -- model and data -------------------------------------------------------

  def _model_and_optimizer(self):
    model = models.MODELS[self.config.model](
        self.data.num_fields, self.data.vocab_size,
        embedding_dim=self.config.embedding_dim, seed=self.config.seed)
    optimizer = _OPTIMIZERS[self.config.optimizer](self.config.learning_rate)
    return model, optimizer

  def _dataset_fn(self, sync: bool):
    return synthetic.dataset_fn(
        self.data.train_ids, self.data.train_labels,
        self.config.local_batch_size, self.config.step_ms,
        self.config.slow_worker, self.config.slowdown,
        shuffle_seed=self.config.seed, num_shards=self.config.num_workers,
        straggler_until=self.config.straggler_until,
        straggler_stop_file=self.config.straggler_stop_file,
        global_batch_size=self.config.global_batch_size if sync else None,
        straggler_period=self.config.straggler_period,
        num_workers=self.config.num_workers,
        nonfinite_worker=self.config.inject_nonfinite_worker)

  # -- phases -----------------------------------------------------------------

  def run(self) -> int:
    if self.config.mode in ("gba", "async") and self.task.task_type in (
        "worker", "ps"):
      cluster_lib.run_server(self.task.task_type, self.task.task_index)
      return 0
    if self.task.is_chief:
      os.makedirs(self.config.model_dir, exist_ok=True)
      with open(os.path.join(self.config.model_dir,
                             f"config-{self.config.mode}.json"), "w") as f:
        json.dump(self.config.to_dict(), f, indent=2)
    if self.config.mode == "sync":
      return self._train(self._sync_strategy(), sync=True)
    try:
      return self._train(self._ps_strategy(), sync=False)
    except Exception as e:  # pylint: disable=broad-except
      if not compat.is_ps_failure(e):
        raise
      # The variables on the lost PS are gone; this process's eager context
      # still points at it. Resume from the last checkpoint in a new phase.
      _log(f"[job] lost a parameter server ({type(e).__name__}); exiting "
           f"with {switching.EXIT_RESUME} to resume from the last "
           "checkpoint")
      return switching.EXIT_RESUME

  def _sync_strategy(self):
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver)
    # The training data repeats forever; without this every get_next waits
    # for the slowest worker and the health monitor sees equal step times.
    compat.disable_get_next_as_optional(strategy)
    return strategy

  def _ps_strategy(self):
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    partitioner = (
        tf.distribute.experimental.partitioners.FixedShardsPartitioner(
            self.config.num_ps))
    if self.config.mode == "async":
      return tf.distribute.experimental.ParameterServerStrategy(
          resolver, partitioner)
    return strategy_lib.GBAStrategy(resolver, self.config.gba, partitioner)

  def _train(self, strategy, sync: bool) -> int:
    c = self.config
    ckpt_dir = os.path.join(c.model_dir, "ckpt")
    with strategy.scope():
      model, optimizer = self._model_and_optimizer()
      if sync:
        health.timed_train_step(model, strategy)
      model.compile(optimizer,
                    tf.keras.losses.BinaryCrossentropy(from_logits=True),
                    metrics=[tf.keras.metrics.AUC(from_logits=True,
                                                  name="auc")])
      restored = checkpoints.restore_latest(ckpt_dir, model, optimizer)
    # Everything is counted in Keras steps of this mode: sync steps are
    # global batches; PS steps are local batches, and every mode processes
    # train_steps global batches' worth of samples (docs/design.md, invariant 5).
    if sync:
      batch, per_step, total = c.global_batch_size, 1, c.train_steps
    else:
      batch, per_step = c.local_batch_size, c.num_aggregate
      total = c.train_steps * c.local_steps_per_step
    done = restored * per_step
    steps_per_epoch = c.steps_per_loop * (1 if sync else
                                          c.local_steps_per_step)
    remaining = total - done
    _log(f"[job] mode={c.mode} workers={c.num_workers} ps={c.num_ps} "
         f"global_batch={c.global_batch_size} "
         f"local_batch={c.local_batch_size} restored_step={restored} "
         f"remaining_local_steps={max(remaining, 0)} "
         f"model_dir={c.model_dir}")

    seconds = 0.0
    health_cb = curve = None
    # One manager per phase: its write is traced once (see
    # checkpoints.CheckpointManager for the leak that avoids).
    manager = checkpoints.CheckpointManager(ckpt_dir, model, optimizer,
                                            is_chief=self.task.is_chief)
    if remaining > 0:
      epochs = math.ceil(remaining / steps_per_epoch)
      health_cb = self._health_callback(
          strategy, sync, 1 if sync else c.local_steps_per_step)
      callbacks = []
      if c.checkpoint_every_loop:
        # Every loop lands in ckpt/: rerunning a preempted command, or the
        # launcher's restart after a PS failure, resumes from the last one.
        callbacks.append(checkpoints.SaveEveryLoop(manager, optimizer))
      callbacks.append(_StopAfterBatches(remaining, steps_per_epoch))
      if health_cb is not None:
        callbacks.append(health_cb)
      if (self.task.is_chief
          and isinstance(strategy, strategy_lib.GBAStrategy)):
        # Counters in every loop's log line: pending gradients and the
        # accumulators' size are what the soak watches stay bounded.
        callbacks.append(gba_callbacks.GBAMetrics(strategy))
      if self.task.is_chief:
        evaluate = c.eval_examples > 0
        curve = _Progress(
            self.data.test_ids[:c.eval_examples] if evaluate else None,
            self.data.test_labels[:c.eval_examples] if evaluate else None,
            lambda epoch: (done + min((epoch + 1) * steps_per_epoch,
                                      remaining)) * batch)
        callbacks.append(curve)
      start = time.perf_counter()
      model.fit(
          tf.keras.utils.experimental.DatasetCreator(self._dataset_fn(sync)),
          epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks,
          verbose=2 if self.task.is_chief else 0)
      seconds = time.perf_counter() - start
    step = int(optimizer.iterations.numpy())
    finished = step * per_step >= total
    eval_seconds = curve.seconds if curve is not None else 0.0
    phase = self._phase(step - restored, seconds - eval_seconds, eval_seconds,
                        strategy, sync, per_step)
    phase["steady_samples_per_s"] = (curve.steady_samples_per_s()
                                     if curve is not None else None)
    # Where this run started: past the phase's first checkpoint when a
    # preempted run resumed from a later loop.
    phase["start_step"] = restored
    manager.save(step)
    if health_cb is not None and health_cb.target and not finished:
      if self.task.is_chief:
        state = switching.SwitchState.load(c.model_dir)
        state.record(health_cb.switch_record(step))
        state.save(c.model_dir)
        self._append_phase(phase)
      return switching.EXIT_SWITCH
    if self.task.is_chief:
      self._append_phase(phase)
      # Samples processed: every scheduled step ran (ClusterCoordinator runs
      # each at least once), whether its gradient was applied or dropped.
      self._write_result(step, total * batch,
                         curve.points if curve is not None else [])
    if c.export_dir:
      self._export(model, sync)
    return 0

  def _export(self, model, sync: bool) -> None:
    c = self.config
    if self.task.is_chief:
      export_lib.export_saved_model(model, c.export_dir)
      _log(f"[job] exported a SavedModel to {c.export_dir}")
    elif sync:
      # MultiWorkerMirroredStrategy: every worker takes part in the save;
      # only the chief's copy is kept.
      scratch = tempfile.mkdtemp(prefix="gba_export_")
      try:
        export_lib.export_saved_model(model, os.path.join(scratch, "model"))
      finally:
        shutil.rmtree(scratch, ignore_errors=True)

  def _health_callback(self, strategy, sync: bool, local_per_step: int):
    c = self.config
    if c.num_workers < 2:
      return None
    if sync:
      source = None
      initial = health.HealthState.HEALTHY
    else:
      if not isinstance(strategy, strategy_lib.GBAStrategy):
        return None  # plain PSS (async) keeps no per-worker counters
      source = health.GBALatencySource(
          strategy.gba_metrics, time.monotonic,
          window_pushes=c.health_check_steps * local_per_step)
      # A GBA phase of an auto job exists because of stragglers.
      initial = (health.HealthState.STRAGGLING if c.auto
                 else health.HealthState.HEALTHY)
    monitor = health.HealthMonitor(c.num_workers, window=c.health_window,
                                   slow_ratio=c.health_slow_ratio,
                                   initial_state=initial)
    log = _log if self.task.is_chief else (lambda _: None)
    return switching.HealthCallback(
        monitor, c.mode, c.health_check_steps * local_per_step, auto=c.auto,
        latency_source=source, log=log)

  def _phase(self, optimizer_steps: int, train_seconds: float,
             eval_seconds: float, strategy, sync: bool,
             per_step: int) -> Dict[str, Any]:
    c = self.config
    # Samples from what ran, not from the config: the optimizer steps this
    # phase executed (a sync step is one global batch; a plain PS step one
    # local batch) or, under GBA, the local gradients the PS counted as
    # pushed (applied, dropped or still pending).
    is_gba = isinstance(strategy, strategy_lib.GBAStrategy)
    gba = strategy.gba_metrics() if is_gba and not sync else None
    if gba is not None:
      samples = gba["pushed"] * c.local_batch_size
    else:
      batch = c.global_batch_size if sync else per_step * c.local_batch_size
      samples = optimizer_steps * batch
    phase = {"mode": c.mode, "optimizer_steps": optimizer_steps,
             "samples": samples, "seconds": train_seconds,
             "eval_seconds": eval_seconds,
             "samples_per_s": samples / train_seconds if train_seconds
                              else 0.0}
    if gba is not None:
      phase["gba"] = gba
    return phase

  def _append_phase(self, phase: Dict[str, Any]) -> None:
    with open(os.path.join(self.config.model_dir, "phases.jsonl"), "a") as f:
      f.write(json.dumps(phase) + "\n")

  def _write_result(self, step: int, samples: int, curve) -> None:
    """Scores the held-out set on a local copy of the final weights."""
    c = self.config
    local, _ = self._model_and_optimizer()
    ckpt = tf.train.latest_checkpoint(os.path.join(c.model_dir, "ckpt"))
    tf.train.Checkpoint(model=local).read(ckpt).expect_partial(
    ).assert_existing_objects_matched()
    logits = _scores(local, self.data.test_ids)
    labels = self.data.test_labels
    result = {"mode": c.mode, "auto": c.auto, "model": c.model,
              "dataset": c.dataset, "preset": c.gba.name,
              "optimizer_steps": step, "samples": samples,
              "test_auc": synthetic.auc(labels, logits),
              "test_logloss": _logloss(labels, logits),
              "best_auc": self.data.best_auc, "curve": curve,
              "switches": [dataclasses.asdict(s) for s in
                           switching.SwitchState.load(c.model_dir).switches]}
    with open(os.path.join(c.model_dir, "result.json"), "w") as f:
      json.dump(result, f, indent=2)
    _log(f"[job] done: {step} optimizer steps, test AUC "
         f"{result['test_auc']:.4f}, logloss {result['test_logloss']:.4f}")


def main(argv) -> None:
  """Body of `scripts/train.py`: validate, then run this task's role."""
  del argv
  f = gba_flags.FLAGS
  # TF's INFO lines (one per closure, collective and TF_CONFIG read) drown
  # the job's own progress in the launcher's merged log.
  tf.get_logger().setLevel("WARNING")
  try:
    mode = (switching.current_mode(f.model_dir) if f.mode == "auto"
            else f.mode)
    task = cluster_lib.parse_tf_config(os.environ.get("TF_CONFIG"), mode)
    config = config_from_flags(task, mode)
  except ValueError as e:
    print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr,
          flush=True)
    sys.exit(2)
  code = Job(config, task).run()
  # Skip TF's teardown: with the cluster going away it only logs noise.
  cluster_lib.exit_now(code)
