"""The training job behind `gba-train`: one program, every task and mode.

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
from typing import Any, Dict

import numpy as np
import tensorflow as tf

from gba_tf import callbacks as gba_callbacks
from gba_tf import checkpoints
from gba_tf import compat
from gba_tf import export as export_lib
from gba_tf import models
from gba_tf import push_trace
from gba_tf import strategy as strategy_lib
from gba_tf import switching
from gba_tf.data import shared_epoch
from gba_tf.data import synthetic
from gba_tf.launch import fit_clock
from gba_tf.launch import flags as gba_flags
from gba_tf.launch import job_config
from gba_tf.launch import job_data
from gba_tf.launch import job_progress
from gba_tf.launch import tasks

_OPTIMIZERS = {
    "adagrad": tf.keras.optimizers.Adagrad,
    "adam": tf.keras.optimizers.Adam,
    "sgd": tf.keras.optimizers.SGD,
}
_log = job_progress.log


class Job:
  """One process of a training job. Not thread-safe."""

  def __init__(self, config: job_config.JobConfig, task: tasks.TaskConfig):
    self.config = config
    self.task = task
    self._data = None
    self._service = None  # the tf.data service, in the chief (shared input)

  @property
  def data(self) -> job_data.JobData:
    if self._data is None:
      self._data = job_data.load_data(self.config)
    return self._data

  # -- model and data -------------------------------------------------------

  def _model_and_optimizer(self):
    model = models.MODELS[self.config.model](
        self.data.num_fields, self.data.vocab_size,
        embedding_dim=self.config.embedding_dim, seed=self.config.seed)
    optimizer = _OPTIMIZERS[self.config.optimizer](self.config.learning_rate)
    return model, optimizer

  def _dataset_fn(self, sync: bool, start_samples: int = 0):
    shared = None
    if self.config.input == "shared":
      # The stream's position is the samples trained so far: a resumed or
      # switched phase goes on where the last stopped, whatever its mode.
      shared = shared_epoch.SharedEpoch(
          self.config.data_service,
          job_name=f"gba_tf-{self.config.mode}-{start_samples}",
          num_examples=len(self.data.train_ids), seed=self.config.seed,
          start=start_samples)
    return synthetic.dataset_fn(
        self.data.train_ids, self.data.train_labels,
        self.config.local_batch_size, self.config.step_ms,
        self.config.stragglers,
        shuffle_seed=self.config.seed, num_shards=self.config.num_workers,
        straggler_until=self.config.straggler_until,
        straggler_stop_file=self.config.straggler_stop_file,
        global_batch_size=self.config.global_batch_size if sync else None,
        straggler_period=self.config.straggler_period,
        num_workers=self.config.num_workers,
        nonfinite_worker=self.config.inject_nonfinite_worker,
        shared=shared)

  # -- phases -----------------------------------------------------------------

  def run(self) -> int:
    if self.config.mode in ("gba", "async") and self.task.task_type in (
        "worker", "ps"):
      tasks.run_server(self.task.task_type, self.task.task_index)
      return 0
    # Before any input pipeline is built, in both strategies (the chief
    # builds the PS workers' iterators): else `fit` can return tens of
    # seconds after training ends.
    compat.disable_device_autotune()
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
           f"with {tasks.EXIT_RESUME} to resume from the last "
           "checkpoint")
      return tasks.EXIT_RESUME

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
    strategy = strategy_lib.GBAStrategy(resolver, self.config.gba,
                                        partitioner)
    if self.config.trace_pushes:
      strategy.extended.aggregator.enable_push_trace()
    return strategy

  def _train(self, strategy, sync: bool) -> int:
    c = self.config
    ckpt_dir = os.path.join(c.model_dir, "ckpt")
    with strategy.scope():
      model, optimizer = self._model_and_optimizer()
      if sync:
        switching.timed_train_step(model, strategy)
      model.compile(optimizer,
                    tf.keras.losses.BinaryCrossentropy(from_logits=True),
                    metrics=[tf.keras.metrics.AUC(from_logits=True,
                                                  name="auc")])
      restored = checkpoints.restore_latest(ckpt_dir, model, optimizer)
    if c.verify_restore and restored:
      # What the variables hold now, on their parameter servers, in a
      # checkpoint of the same layout (every sync worker takes part).
      checkpoints.save(os.path.join(c.model_dir, "restored"), model,
                       optimizer, is_chief=self.task.is_chief)
    # Everything is counted in Keras steps of this mode: sync steps are
    # global batches; PS steps are local batches, and every mode processes
    # train_steps global batches' worth of samples (docs/design.md, invariant 5).
    if sync:
      batch, per_step, total = c.global_batch_size, 1, c.train_steps
    else:
      batch, per_step = c.local_batch_size, c.num_aggregate
      total = c.train_steps * c.local_batches_per_global_batch
    # Progress in samples, as the checkpoint's writer recorded it: the
    # restored optimizer.iterations counts local batches if plain async
    # wrote it and global batches otherwise, so after a change of mode it
    # alone would misstate how far training got (a checkpoint without the
    # record is read in this mode's units).
    recorded = checkpoints.restored_samples(ckpt_dir)
    start_samples = (recorded if recorded is not None
                     else restored * per_step * batch)
    done = start_samples // batch

    def samples_at(iterations: int) -> int:
      return start_samples + (iterations - restored) * per_step * batch
    steps_per_epoch = c.steps_per_loop * (1 if sync else
                                          c.local_batches_per_global_batch)
    remaining = total - done
    _log(f"[job] mode={c.mode} workers={c.num_workers} ps={c.num_ps} "
         f"global_batch={c.global_batch_size} "
         f"local_batch={c.local_batch_size} restored_step={restored} "
         f"remaining_local_steps={max(remaining, 0)} "
         f"model_dir={c.model_dir}")

    seconds = release_seconds = 0.0
    health_cb = curve = None
    # One manager per phase: its write is traced once (see
    # checkpoints.CheckpointManager for the leak that avoids).
    manager = checkpoints.CheckpointManager(ckpt_dir, model, optimizer,
                                            is_chief=self.task.is_chief)
    if remaining > 0:
      epochs = math.ceil(remaining / steps_per_epoch)
      health_cb = self._health_callback(
          strategy, sync, 1 if sync else c.local_batches_per_global_batch)
      callbacks = []
      if c.checkpoint_every_loop:
        # Every loop lands in ckpt/: rerunning a preempted command, or the
        # launcher's restart after a PS failure, resumes from the last one.
        callbacks.append(gba_callbacks.SaveEveryLoop(manager, optimizer,
                                                     samples_at))
      callbacks.append(job_progress.StopAfterBatches(remaining, steps_per_epoch))
      if health_cb is not None:
        callbacks.append(health_cb)
      if (self.task.is_chief
          and isinstance(strategy, strategy_lib.GBAStrategy)):
        # Counters in every loop's log line: pending gradients and the
        # accumulators' size are what the soak watches stay bounded.
        callbacks.append(gba_callbacks.GBAMetrics(strategy))
      if self.task.is_chief:
        evaluate = c.eval_examples > 0
        curve = job_progress.Progress(
            self.data.test_ids[:c.eval_examples] if evaluate else None,
            self.data.test_labels[:c.eval_examples] if evaluate else None,
            start_samples, batch)
        callbacks.append(curve)
      if c.input == "shared" and self.task.is_chief:
        self._start_data_service()
      # Timed to the end of training: what `fit`'s return then releases is
      # not training (fit_clock), and is recorded apart.
      _, seconds, release_seconds = fit_clock.timed_fit(
          model,
          tf.keras.utils.experimental.DatasetCreator(
              self._dataset_fn(sync, start_samples)),
          epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks,
          verbose=2 if self.task.is_chief else 0)
    step = int(optimizer.iterations.numpy())
    finished = samples_at(step) >= total * batch
    eval_seconds = curve.seconds if curve is not None else 0.0
    phase = self._phase(step - restored, seconds - eval_seconds, eval_seconds,
                        strategy, sync, per_step)
    phase["release_seconds"] = release_seconds
    phase["steady_samples_per_s"] = (curve.steady_samples_per_s()
                                     if curve is not None else None)
    # The phase's held-out curve: result.json keeps only the last phase's,
    # and a job that switches modes (auto) is judged on all of them.
    phase["curve"] = curve.points if curve is not None else []
    # Where this run started: past the phase's first checkpoint when a
    # preempted run resumed from a later loop.
    phase["start_step"] = restored
    phase["start_samples"] = start_samples
    manager.save(step, samples=samples_at(step))
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

  def _start_data_service(self) -> None:
    """The tf.data service of --input=shared: dispatcher + one data worker.

    In this task because it already exists on every cluster shape (the
    chief, or worker 0 of a sync cluster without one); serving batches of
    example indices is light enough for one data worker (see
    `gba_tf.data.shared_epoch`).
    """
    address = self.config.data_service[len("grpc://"):]
    host, port = address.rsplit(":", 1)
    self._service = shared_epoch.DataService(int(port), host=host)
    if self.config.data_service.endswith(":0"):
      # A one-process job: the port was left to the system.
      self.config = dataclasses.replace(
          self.config, data_service=self._service.target)
    _log(f"[job] tf.data service at {self._service.target} (shared epoch)")

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
      initial = switching.HealthState.HEALTHY
    else:
      if not isinstance(strategy, strategy_lib.GBAStrategy):
        return None  # plain PSS (async) keeps no per-worker counters
      source = switching.GBALatencySource(
          strategy.gba_metrics, time.monotonic,
          window_pushes=c.health_check_steps * local_per_step)
      # A GBA phase of an auto job exists because of stragglers.
      initial = (switching.HealthState.STRAGGLING if c.auto
                 else switching.HealthState.HEALTHY)
    monitor = switching.HealthMonitor(c.num_workers, window=c.health_window,
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
      # Read once, at the end of the phase: the trace is a large variable
      # on ps:0, and gba_metrics() also serves the periodic health checks.
      trace = strategy.extended.aggregator.push_trace()
      if trace is not None:
        # Keras ends each loop (epoch) of steps_per_loop global batches by
        # joining every step: the phases keep the pause between loops
        # apart from a step's own dispatch. Loops are counted from the
        # run's first push: not in a trace whose ring dropped the oldest.
        whole = len(trace) == gba["pushed"]
        gba["push_phases"] = push_trace.phases(
            trace, c.num_workers,
            loop_steps=(c.steps_per_loop * c.local_batches_per_global_batch
                        if whole else 0))
        # The raw rows (gba_tf.push_trace.COLUMNS), for a closer look than
        # the phases' means.
        np.save(os.path.join(c.model_dir, f"push_trace-{c.mode}.npy"), trace)
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
    logits = job_data.scores(local, self.data.test_ids)
    labels = self.data.test_labels
    result = {"mode": c.mode, "auto": c.auto, "model": c.model,
              "dataset": c.dataset, "preset": c.gba.name,
              "optimizer_steps": step, "samples": samples,
              "test_auc": synthetic.auc(labels, logits),
              "test_logloss": job_data.logloss(labels, logits),
              "best_auc": self.data.best_auc, "curve": curve,
              "switches": [dataclasses.asdict(s) for s in
                           switching.SwitchState.load(c.model_dir).switches]}
    with open(os.path.join(c.model_dir, "result.json"), "w") as f:
      json.dump(result, f, indent=2)
    _log(f"[job] done: {step} optimizer steps, test AUC "
         f"{result['test_auc']:.4f}, logloss {result['test_logloss']:.4f}")


def main(argv) -> None:
  """Body of `gba-train`: validate, then run this task's role."""
  del argv
  # Started by gba-launch's LocalLauncher: exit with it, however it dies.
  tasks.die_with_parent()
  f = gba_flags.FLAGS
  # TF's INFO lines (one per closure, collective and TF_CONFIG read) drown
  # the job's own progress in the launcher's merged log.
  tf.get_logger().setLevel("WARNING")
  try:
    mode = (switching.current_mode(f.model_dir) if f.mode == "auto"
            else f.mode)
    task = tasks.parse_tf_config(os.environ.get("TF_CONFIG"), mode)
    config = job_config.config_from_flags(task, mode)
  except ValueError as e:
    print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr,
          flush=True)
    sys.exit(2)
  code = Job(config, task).run()
  # Skip TF's teardown: with the cluster going away it only logs noise.
  tasks.exit_now(code)
