"""Checkpoints that load across modes (sync <-> GBA), optimizer slots included.

A `tf.train.Checkpoint(model=, optimizer=)` stores every variable whole: a
ShardedVariable on the parameter servers is saved as one tensor, so the same
files restore into MultiWorkerMirroredStrategy, GBAStrategy or a single
process. Two traps (DESIGN.md section 4) are handled here:

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
"""

import shutil
import tempfile

import tensorflow as tf

# Enough to survive a write interrupted mid-way; older ones are of no use
# once a newer one is complete.
_MAX_TO_KEEP = 3


def _checkpoint(model, optimizer) -> tf.train.Checkpoint:
  return tf.train.Checkpoint(model=model, optimizer=optimizer)


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


def save(directory: str, model, optimizer, is_chief: bool = True) -> str:
  """Writes a checkpoint numbered by `optimizer.iterations`; returns its path.

  Every worker of a MultiWorkerMirroredStrategy job must call this; only the
  chief's copy is kept.
  """
  target = directory if is_chief else tempfile.mkdtemp(prefix="gba_ckpt_")
  manager = tf.train.CheckpointManager(_checkpoint(model, optimizer), target,
                                       max_to_keep=_MAX_TO_KEEP)
  path = manager.save(checkpoint_number=int(optimizer.iterations.numpy()))
  if not is_chief:
    shutil.rmtree(target, ignore_errors=True)
  return path
