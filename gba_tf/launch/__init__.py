"""The launch layer: everything that turns flags and TF_CONFIG into a job.

* `tasks`: TF_CONFIG validation and task start-up (servers, ports,
  environment, exit codes).
* `flags`: the absl flags of every binary; `job_config`: flags and TF_CONFIG
  resolved once into a `JobConfig`.
* `job`, `job_data`, `job_progress`: the training program every task runs
  (`gba-train`), its data and its progress callbacks.
* `launcher`: the local multi-process launcher behind `gba-launch`.
* `local_cluster`: in-process and one-process-per-task clusters for tests,
  demos and benchmarks; `loopback`: keeps their servers on 127.0.0.1.

Depends on `gba_tf.switching` and the library; nothing there depends on it.
Modules are imported one by one (`from gba_tf.launch import tasks`): this
package imports none of them, so the light ones stay light.
"""
