"""The job's configuration, resolved once from flags and TF_CONFIG.

`config_from_flags` is the one place flags become a `JobConfig`: it checks
every flag against the cluster and names the bad value, and resolves the
`GBAConfig` of the PS modes with `gba_config_from_flags`, which the demo and
micro-benchmark scripts use on their own.
"""

import dataclasses
import tempfile
from typing import Any, Dict, Optional

from absl import logging

from gba_tf import config as config_lib
from gba_tf import export as export_lib
from gba_tf.launch import flags as gba_flags
from gba_tf.launch import tasks


@dataclasses.dataclass(frozen=True)
class JobConfig:
  """Everything one training job needs, resolved from flags and TF_CONFIG.

  Attributes mirror the flags of `flags.define_flags` (see their
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
  vocab_per_field: int
  train_examples: int
  test_examples: int
  eval_examples: int
  checkpoint_every_loop: bool
  verify_restore: bool
  export_dir: Optional[str]
  seed: int
  step_ms: float
  stragglers: Dict[int, float]
  straggler_until: float
  straggler_stop_file: str
  straggler_period: int
  inject_nonfinite_worker: int
  trace_pushes: bool
  input: str
  data_service: Optional[str]
  health_check_steps: int
  health_window: int
  health_slow_ratio: float

  @property
  def local_batch_size(self) -> int:
    return self.gba.local_batch_size

  @property
  def local_batches_per_global_batch(self) -> int:
    """Local batches in one synchronous global batch: M of the `gba`
    preset, and how many local steps every PS mode runs per optimizer step
    of sync (the other presets' M, `num_aggregate`, may differ)."""
    return self.global_batch_size // self.local_batch_size

  @property
  def num_aggregate(self) -> int:
    """M: local gradients per optimizer step of this PS mode (async: 1)."""
    return 1 if self.mode == "async" else self.gba.num_aggregate

  def to_dict(self) -> Dict[str, Any]:
    out = dataclasses.asdict(self)
    out["gba"] = self.gba.get_config()
    return out


def _positive(name: str, value) -> None:
  if value is None or value <= 0:
    raise ValueError(f"Received: --{name}={value}, which must be > 0.")


def config_from_flags(task: tasks.TaskConfig,
                      mode: str) -> JobConfig:
  """Validates the flags against TF_CONFIG; raises ValueError naming a value."""
  f = gba_flags.FLAGS
  for name in ("workers", "local_batch_size", "train_steps",
               "steps_per_loop", "learning_rate", "embedding_dim",
               "vocab_per_field",
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
  stragglers = gba_flags.parse_straggler(f.straggler)
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
  if stragglers and max(stragglers) >= workers:
    raise ValueError(f"Received: --straggler={f.straggler}, but there are "
                     f"only {workers} workers.")
  # Validates the global batch (a multiple of the local one) for every mode.
  gba_config = gba_config_from_flags(num_workers=workers)
  global_batch = global_batch_from_flags(workers)
  if mode == "sync" and global_batch % workers:
    raise ValueError(
        f"Received: global_batch_size={global_batch}, which is not a "
        f"multiple of the {workers} sync workers.")
  if f.export_dir:
    export_lib.check_export_dir(f.export_dir)
  data_service = _data_service(task, mode, f.input, f.data_service_port)
  model_dir = f.model_dir or tempfile.mkdtemp(prefix="gba_train_")
  return JobConfig(
      mode=mode, auto=f.mode == "auto", model_dir=model_dir,
      num_workers=workers, num_ps=len(task.cluster.get("ps", [])),
      global_batch_size=global_batch, gba=gba_config,
      train_steps=f.train_steps, steps_per_loop=f.steps_per_loop,
      optimizer=f.optimizer, learning_rate=f.learning_rate, model=f.model,
      dataset=f.dataset, embedding_dim=f.embedding_dim,
      vocab_per_field=f.vocab_per_field,
      train_examples=f.train_examples, test_examples=f.test_examples,
      eval_examples=f.eval_examples,
      checkpoint_every_loop=f.checkpoint_every_loop,
      verify_restore=f.verify_restore,
      export_dir=f.export_dir, seed=f.seed, step_ms=f.step_ms,
      stragglers=stragglers,
      straggler_until=f.straggler_until,
      straggler_stop_file=f.straggler_stop_file,
      straggler_period=f.straggler_period,
      inject_nonfinite_worker=f.inject_nonfinite_worker,
      trace_pushes=f.trace_pushes,
      input=f.input, data_service=data_service,
      health_check_steps=f.health_check_steps,
      health_window=f.health_window,
      health_slow_ratio=f.health_slow_ratio)


def _data_service(task: tasks.TaskConfig, mode: str, input_mode: str,
                  port: int) -> Optional[str]:
  """The tf.data service dispatcher's address (--input=shared), or None.

  It runs in the chief task, at the chief's host as TF_CONFIG names it.
  """
  if not 0 <= port < 65536:
    raise ValueError(f"Received: --data_service_port={port}, which must be "
                     "in [0, 65535].")
  if input_mode != "shared":
    return None
  chief = task.cluster.get("chief") or task.cluster.get("worker")
  if not chief or task.task_type is None:
    return f"grpc://127.0.0.1:{port}"
  if port == 0:
    raise ValueError("Received: --data_service_port=0 with --input=shared "
                     f"in a {mode} cluster; every task must know the port "
                     "of the chief's tf.data service.")
  return f"grpc://{chief[0].rsplit(':', 1)[0]}:{port}"


def global_batch_from_flags(num_workers=None) -> int:
  """--global_batch_size, by default workers * --local_batch_size."""
  f = gba_flags.FLAGS
  return f.global_batch_size or (num_workers or f.workers) * f.local_batch_size


def gba_config_from_flags(num_workers=None) -> config_lib.GBAConfig:
  """The GBAConfig of --preset (default gba) for `num_workers` workers."""
  workers = num_workers or gba_flags.FLAGS.workers
  global_batch = global_batch_from_flags(workers)
  overrides = {
      name: gba_flags.FLAGS[name].value
      for name in ("staleness_threshold", "decay", "decay_rate",
                   "max_staleness", "normalize")
      if gba_flags.FLAGS[name].value is not None}
  # The synchronous global batch fixes every mode's samples per optimizer
  # step, so it is checked (a multiple of the local batch) whatever the
  # preset: by GBAConfig, the one place that check is written.
  gba = config_lib.GBAConfig(global_batch_size=global_batch,
                             local_batch_size=gba_flags.FLAGS.local_batch_size,
                             **overrides)
  preset = (gba_flags.FLAGS["preset"].value if "preset" in gba_flags.FLAGS
            else "gba")
  if preset == "gba":
    return gba
  return config_lib.GBAConfig.preset(
      preset, local_batch_size=gba_flags.FLAGS.local_batch_size,
      global_batch_size=global_batch, num_workers=workers,
      # `or 4` would turn --max_staleness=0 (drop every stale gradient)
      # into 4.
      max_staleness=(4 if gba_flags.FLAGS.max_staleness is None
                     else gba_flags.FLAGS.max_staleness))
