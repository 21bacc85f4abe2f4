"""SavedModel export of a model trained with GBA, for TF Serving.

A model trained under `GBAStrategy` keeps its variables on the parameter
servers, embeddings split into shards. `export_saved_model` writes a
SavedModel from the coordinator with one `serving_default` signature; TF
saves a `ShardedVariable` as one whole variable, so the export loads with
plain TensorFlow (`tf.saved_model.load`, TF Serving), with no gba_tf and no
cluster.

Example:

```python
with strategy.scope():
  model = ...
model.fit(...)
gba_tf.export.export_saved_model(model, "/models/ctr/1")

# Anywhere, with TensorFlow only:
serve = tf.saved_model.load("/models/ctr/1").signatures["serving_default"]
logits = serve(ids=tf.constant([[1, 2, 3, 4, 5, 6, 7, 8]]))["logits"]
```
"""

import os
from typing import Dict

import tensorflow as tf

SIGNATURE_KEY = "serving_default"
OUTPUT_KEY = "logits"


def serving_signature(model: tf.keras.Model):
  """`model(inputs, training=False)` as a `tf.function` with one input spec
  per model input (batch dimension open), returning {"logits": output}."""
  if not model.inputs:
    raise ValueError(
        f"Received: model={model.name!r}, which has no known inputs; build "
        "it (call it once, or use the functional API) before exporting.")
  specs = [tf.TensorSpec([None] + list(t.shape[1:]), t.dtype,
                         name=t.name.split(":")[0]) for t in model.inputs]

  @tf.function(input_signature=specs)
  def serve(*inputs) -> Dict[str, tf.Tensor]:
    features = inputs[0] if len(inputs) == 1 else list(inputs)
    return {OUTPUT_KEY: model(features, training=False)}

  return serve


def check_export_dir(export_dir: str) -> None:
  """Raises ValueError unless `export_dir` is new or empty (one version per
  directory, as TF Serving expects); `--export_dir` is checked before
  training with it, so that the export cannot fail at the end."""
  if tf.io.gfile.exists(export_dir) and tf.io.gfile.listdir(export_dir):
    raise ValueError(
        f"Received: export_dir={export_dir!r}, which is not empty; TF "
        "Serving expects one version per directory.")


def export_saved_model(model: tf.keras.Model, export_dir: str) -> str:
  """Writes `model` as a SavedModel with a `serving_default` signature.

  Call on the coordinator (the chief) after training; the variables are
  read from the parameter servers. Inputs keep the names of the model's
  `tf.keras.Input`s; the output is "logits".

  Args:
    model: a built Keras model (functional or subclassed and called).
    export_dir: a new or empty directory.

  Returns:
    `export_dir`.
  """
  check_export_dir(export_dir)
  signature = serving_signature(model)
  tf.saved_model.save(model, export_dir,
                      signatures={SIGNATURE_KEY: signature})
  return os.fspath(export_dir)
