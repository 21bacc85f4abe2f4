"""Keras callbacks for GBA training."""

from typing import Optional

import tensorflow as tf

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
