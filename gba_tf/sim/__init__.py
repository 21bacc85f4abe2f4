"""Scale by simulation: GBA and its baselines for up to 10,000 workers.

* `timing`: worker compute times (constant, lognormal, straggler episodes).
* `engine`: the discrete-event simulator; the rules a push follows come from
  `gba_tf.schedule` and `gba_tf.staleness`, the functions the runtime runs.
* `accuracy`: trains a small numpy model along a simulated schedule, each
  gradient on the parameter version its token names.
* `calibration`: fits the time costs to measured local runs and compares.

`scripts/simulate.py` (`gba-simulate`) runs the sweep behind the README's
predictions. The simulator depends on the library only (no TensorFlow ops).
"""
