"""Keras callbacks of the training job: its length and its progress log."""

import time
from typing import Optional

import tensorflow as tf

from gba_tf.data import synthetic
from gba_tf.launch import job_data


def log(message: str) -> None:
  """One line of the job's log, flushed at once: the launcher merges the
  tasks' outputs line by line."""
  print(message, flush=True)


class StopAfterBatches(tf.keras.callbacks.Callback):
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


class Progress(tf.keras.callbacks.Callback):
  """Per-loop timing and, optionally, held-out AUC (AUC-vs-samples plots).

  Runs on the chief only. Keras ends an epoch after joining its steps, so
  evaluation time is idle time for the workers: it is measured apart
  (`eval_seconds`), not counted as training time. The first loop includes
  tracing and warm-up; `steady_samples_per_s` leaves it out.

  Samples are counted from the batches each loop ran, not from its planned
  length: a loop that a mode switch cuts short (`--mode=auto` stops `fit`
  mid-loop) ends on the samples it trained. Counting planned loops put the
  evaluation at a switch one whole loop ahead of the next phase's first
  point, and overstated that loop's samples/s.
  """

  def __init__(self, ids, labels, start_samples: int, batch_size: int):
    super().__init__()
    # Reads no logs: allowed as a batch-level callback under PSS.
    self._supports_tf_logs = True
    self._ids, self._labels = ids, labels
    self._batch_size = batch_size
    self._samples = start_samples  # at the end of the last finished loop
    self._loop_batches = 0  # Keras steps (batches) run in this loop
    self.points = []
    self.loops = []  # (samples, training seconds) per loop
    self.seconds = 0.0
    self._begin = None

  def on_train_begin(self, logs=None):
    # The starting point of the curve (the restored step, if any).
    if self._ids is not None:
      self._evaluate(self._samples)

  def on_epoch_begin(self, epoch, logs=None):
    self._loop_batches = 0
    self._begin = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    # `batch` is the loop's last step index so far (the last of a
    # steps_per_execution group); under PSS every scheduled step has run
    # by the time Keras ends the loop.
    self._loop_batches = batch + 1

  def _evaluate(self, samples):
    start = time.perf_counter()
    logits = job_data.scores(self.model, self._ids)
    self.points.append({
        "optimizer_steps": int(self.model.optimizer.iterations.numpy()),
        "samples": samples,
        # Training seconds so far (evaluations left out): AUC vs wall-clock.
        "train_seconds": sum(t for _, t in self.loops),
        "auc": synthetic.auc(self._labels, logits),
        "logloss": job_data.logloss(self._labels, logits)})
    self.seconds += time.perf_counter() - start

  def on_epoch_end(self, epoch, logs=None):
    loop_samples = self._loop_batches * self._batch_size
    self._samples += loop_samples
    self.loops.append((loop_samples, time.perf_counter() - self._begin))
    if self._ids is not None:
      self._evaluate(self._samples)

  def steady_samples_per_s(self) -> Optional[float]:
    steady = self.loops[1:]
    seconds = sum(t for _, t in steady)
    return sum(n for n, _ in steady) / seconds if seconds else None
