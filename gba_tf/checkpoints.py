"""Checkpoints that load across modes (sync <-> GBA), optimizer slots included.

A `tf.train.Checkpoint(model=, optimizer=)` stores every variable whole: a
ShardedVariable on the parameter servers is saved as one tensor, so the same
files restore into MultiWorkerMirroredStrategy, GBAStrategy or a single
process. Two traps (docs/design.md, section 4) are handled here:

* the optimizer must be built *before* the read, under the strategy's scope;
  a lazily-built optimizer restores its slots wrong into sharded variables;
* only the chief may write into the model directory; in
  MultiWorkerMirroredStrategy every worker must still call save, so the
  others write into a temporary directory that is removed afterwards.

Example:

```python
with strategy.scope():
  model = build_model()
  optimizer = tf.keras.optimizers.Adagrad(0.1)
  step = gba_tf.checkpoints.restore_latest(ckpt_dir, model, optimizer)
...
gba_tf.checkpoints.save(ckpt_dir, model, optimizer, is_chief=True)
```

Saving every loop goes through `CheckpointManager`, which traces the write
once: TensorFlow's own eager save leaks memory on every parameter server at
every save (see the class).
"""

import json
import os
import shutil
import tempfile
from typing import Optional

import tensorflow as tf

from gba_tf import compat

# Enough to survive a write interrupted mid-way; older ones are of no use
# once a newer one is complete.
_MAX_TO_KEEP = 3
# Next to `ckpt-<n>`: the samples trained up to it (`restored_samples`).
_PROGRESS_SUFFIX = ".progress.json"


def _checkpoint(model, optimizer) -> tf.train.Checkpoint:
  return tf.train.Checkpoint(model=model, optimizer=optimizer)


def restored_samples(directory: str) -> Optional[int]:
  """Training samples the latest checkpoint in `directory` had processed,
  as `CheckpointManager.save` recorded them; 0 without a checkpoint, None
  for a checkpoint saved without them."""
  path = tf.train.latest_checkpoint(directory) if directory else None
  if not path:
    return 0
  if not tf.io.gfile.exists(path + _PROGRESS_SUFFIX):
    return None
  with tf.io.gfile.GFile(path + _PROGRESS_SUFFIX) as f:
    return int(json.load(f)["samples"])


def restore_latest(directory: str, model, optimizer) -> int:
  """Builds `optimizer` for `model` and restores the latest checkpoint.

  Call under the strategy's scope. Returns the restored
  `optimizer.iterations` (0 when `directory` holds no checkpoint).
  """
  optimizer.build(model.trainable_variables)
  path = tf.train.latest_checkpoint(directory) if directory else None
  if path:
    _checkpoint(model, optimizer).read(path).assert_existing_objects_matched()
  return int(optimizer.iterations.numpy())


class CheckpointManager:
  """Numbered checkpoints of `(model, optimizer)` in one directory.

  Why not `tf.train.CheckpointManager`: in TF 2.21 an eager save whose
  variables live on more than one task (every ParameterServerStrategy job)
  traces a fresh multi-device function per save (`MultiDeviceSaver.save`),
  and a task cannot release a remote component of a function ("Releasing a
  multi-device component handle on a remote device is not yet
  implemented"). Every save then stays in every parameter server's memory:
  about 0.4 MiB per save and PS for a small model, without end. Here the
  write is traced once, with the file prefix as a string tensor, and traced
  again only when the set of variables changes.

  The directory's `checkpoint` file is kept as TensorFlow writes it, so
  `tf.train.latest_checkpoint` and `restore_latest` read it; files of
  checkpoints beyond the newest `max_to_keep` are deleted.

  Example:

  ```python
  manager = gba_tf.checkpoints.CheckpointManager(ckpt_dir, model, optimizer)
  for loop in range(loops):
    model.fit(..., epochs=1)
    manager.save(int(optimizer.iterations.numpy()))
  ```

  Args:
    directory: where the chief's checkpoints go.
    model: a Keras model (its variables are created).
    optimizer: its optimizer, built (`restore_latest` builds it).
    max_to_keep: checkpoints kept; older ones are deleted.
    is_chief: False for a MultiWorkerMirroredStrategy worker other than the
      chief, which must still write (its variables are read collectively)
      and writes into a temporary directory that is removed at once.
  """

  def __init__(self, directory: str, model, optimizer,
               max_to_keep: int = _MAX_TO_KEEP, is_chief: bool = True):
    if max_to_keep < 1:
      raise ValueError(f"Received: max_to_keep={max_to_keep}, which must be "
                       "at least 1.")
    self.directory = directory
    self._model = model
    self._optimizer = optimizer
    self._max_to_keep = max_to_keep
    self._is_chief = is_chief
    self._checkpoint = _checkpoint(model, optimizer)
    self._write = None
    self._writes = []  # every write function built, for `traces`
    self._traced_for = None
    self._last = None
    state = (tf.train.get_checkpoint_state(directory)
             if is_chief and tf.io.gfile.isdir(directory) else None)
    self._kept = ([os.path.basename(p)
                   for p in state.all_model_checkpoint_paths]
                  if state is not None else [])

  def _variable_counts(self):
    variables = self._optimizer.variables
    # The legacy optimizer's `variables` is a method, the new one's a list.
    variables = variables() if callable(variables) else variables
    return len(self._model.variables), len(variables)

  def _writer(self):
    counts = self._variable_counts()
    if self._write is None or counts != self._traced_for:
      checkpoint = self._checkpoint
      self._write = tf.function(
          lambda prefix: checkpoint.write(prefix),
          input_signature=[tf.TensorSpec([], tf.string)])
      self._traced_for = counts
      self._writes.append(self._write)
    return self._write

  @property
  def traces(self) -> int:
    """Traces of every write function this manager built (1 when steady).

    A new function per save, or a retrace of one, is what leaks on the PS;
    either raises this count.
    """
    return sum(w.experimental_get_tracing_count() for w in self._writes)

  def save(self, step: int, samples: Optional[int] = None) -> str:
    """Writes checkpoint `ckpt-<step>`; returns its path prefix.

    `samples`: training samples processed up to this checkpoint, kept next
    to it (`ckpt-<step>.progress.json`, read by `restored_samples`).
    `optimizer.iterations` alone cannot say: it counts global batches in
    sync and GBA but local batches in plain async, so after a change of
    mode the same count means different amounts of training.

    A second save at the step this manager last saved writes nothing: the
    variables change only with the step.
    """
    name = f"ckpt-{int(step)}"
    if name == self._last:
      return os.path.join(self.directory, name)
    if not self._is_chief:
      target = tempfile.mkdtemp(prefix="gba_ckpt_")
      try:
        self._writer()(tf.constant(os.path.join(target, name)))
      finally:
        shutil.rmtree(target, ignore_errors=True)
      self._last = name
      return os.path.join(self.directory, name)
    tf.io.gfile.makedirs(self.directory)
    path = os.path.join(self.directory, name)
    self._writer()(tf.constant(path))
    if samples is not None:
      # Before the `checkpoint` file names it: a restore never finds the
      # checkpoint without its progress.
      with tf.io.gfile.GFile(path + _PROGRESS_SUFFIX, "w") as f:
        f.write(json.dumps({"iterations": int(step),
                            "samples": int(samples)}))
    self._last = name
    # Recorded before anything is deleted: a crash in between leaves at
    # most stale files, never a `checkpoint` file naming a deleted one.
    self._kept = [n for n in self._kept if n != name] + [name]
    dropped, self._kept = (self._kept[:-self._max_to_keep],
                           self._kept[-self._max_to_keep:])
    compat.update_checkpoint_state(self.directory, name, self._kept)
    for old in dropped:
      for f in tf.io.gfile.glob(os.path.join(self.directory, old) + ".*"):
        tf.io.gfile.remove(f)
    return path


def save(directory: str, model, optimizer, is_chief: bool = True) -> str:
  """Writes one checkpoint numbered by `optimizer.iterations`; returns it.

  Every worker of a MultiWorkerMirroredStrategy job must call this; only the
  chief's copy is kept. Each call traces the write anew: for repeated saves
  keep one `CheckpointManager`.
  """
  manager = CheckpointManager(directory, model, optimizer, is_chief=is_chief)
  return manager.save(int(optimizer.iterations.numpy()))
