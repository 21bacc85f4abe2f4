"""Keras callbacks the library offers for GBA training.

* `GBAMetrics`: the PS counters in every epoch's logs and in TensorBoard.
* `SaveEveryLoop`: a checkpoint through a `checkpoints.CheckpointManager`
  at the end of every loop.

(The switching layer's `HealthCallback` is in `gba_tf.switching`; the
training job's own progress callbacks in `gba_tf.launch.job_progress`.)
"""

from typing import Optional

import tensorflow as tf

from gba_tf import checkpoints

# Counters reported as scalars; lists (histogram, per worker) go to
# TensorBoard only, where they have a natural form.
_SCALAR_KEYS = ("pushed", "applied", "decayed", "dropped", "nonfinite",
                "pending", "lost", "global_steps", "accumulator_bytes")


class GBAMetrics(tf.keras.callbacks.Callback):
  """Adds GBA runtime counters to `logs` and, optionally, TensorBoard.

  At the end of every epoch, `logs["gba/<counter>"]` receives the counters of
  `strategy.gba_metrics()` (so `History` and a later `TensorBoard` callback
  see them), and with `log_dir` the staleness histogram and per-worker
  gradient counts are written as TensorBoard summaries.

  Put it before `tf.keras.callbacks.TensorBoard` in the callback list so
  TensorBoard also plots the scalars.

  Example:

  ```python
  model.fit(..., callbacks=[gba_tf.callbacks.GBAMetrics(strategy, log_dir),
                            tf.keras.callbacks.TensorBoard(log_dir)])
  ```

  Args:
    strategy: the `GBAStrategy` training the model.
    log_dir: directory for TensorBoard summaries (subdirectory `gba`), or
      None for logs only.
  """

  def __init__(self, strategy, log_dir: Optional[str] = None):
    super().__init__()
    if not hasattr(strategy, "gba_metrics"):
      raise TypeError(f"Received: strategy={strategy!r}, which is not a "
                      "GBAStrategy.")
    self._strategy = strategy
    self._writer = (tf.summary.create_file_writer(f"{log_dir}/gba")
                    if log_dir else None)

  def on_epoch_end(self, epoch, logs=None):
    metrics = self._strategy.gba_metrics()
    if logs is not None:
      for key in _SCALAR_KEYS:
        logs[f"gba/{key}"] = metrics[key]
    if self._writer is None:
      return
    with self._writer.as_default(step=epoch):
      for key in _SCALAR_KEYS:
        tf.summary.scalar(f"gba/{key}", metrics[key])
      hist = metrics["staleness_histogram"]
      taus = [t for t, n in enumerate(hist) for _ in range(n)]
      if taus:
        tf.summary.histogram("gba/staleness", taus)
      for i, (pushed, secs) in enumerate(zip(
          metrics["worker_pushed"], metrics["worker_mean_step_seconds"])):
        tf.summary.scalar(f"gba/worker_{i}/pushed", pushed)
        tf.summary.scalar(f"gba/worker_{i}/mean_step_seconds", secs)
    self._writer.flush()


class SaveEveryLoop(tf.keras.callbacks.Callback):
  """Saves through a `CheckpointManager` at the end of every Keras epoch.

  An epoch is one loop of `steps_per_epoch` steps; rerunning a preempted
  job restores the last one with `checkpoints.restore_latest`, so at most
  one loop of work is lost. Every MultiWorkerMirroredStrategy worker runs it (the
  manager's `is_chief` decides who keeps the files).
  """

  def __init__(self, manager: checkpoints.CheckpointManager, optimizer,
               samples_at=None):
    """`samples_at`: optional, iterations -> training samples processed,
    recorded with each checkpoint (see `CheckpointManager.save`)."""
    super().__init__()
    self.manager = manager
    self._optimizer = optimizer
    self._samples_at = samples_at

  def on_epoch_end(self, epoch, logs=None):
    step = int(self._optimizer.iterations.numpy())
    self.manager.save(step, samples=(self._samples_at(step) if
                                     self._samples_at else None))
