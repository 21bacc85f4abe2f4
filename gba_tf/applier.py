"""The applier: global steps applied off the push path (docs/design.md §3).

A push that completes global step `s` does not apply it in its own step
function. Had it done so, the apply (the optimizer on every shard, a loop
over the steps that complete meanwhile) would be part of *every* push's
graph: TensorFlow lowers a conditional apply into the push, and a push that
does not apply still walks every node of the untaken branch and sends its
cross-task tensors as "dead" ones. That was most of the nodes the parameter
servers ran per push (DCN-v2 on 2 PS: 1,277 against plain
ParameterServerStrategy's 347, 684 of them the apply loop).

Instead one long-running function, started once from the chief, waits on
the first PS task for completed steps (a FIFO queue of step numbers) and
applies each on every shard, chaining the steps that complete meanwhile,
exactly as the claiming push did. The claiming push enqueues the step and
waits for the applier's reply on a second queue, so a push that completes a
step still returns only once the step is applied (the same global step as
before for whoever reads a token after it).

The function runs on the parameter servers, not in the chief's Python: the
chief's thread only waits for it to end. `stop()` (also at exit, and before
a test leaves its cluster) sends it the step -1, which ends it.
"""

import atexit
import threading
import weakref

from absl import logging
import tensorflow as tf

# Appliers whose function runs; stopped at exit so that no thread is inside
# a TensorFlow call while the interpreter shuts down.
_RUNNING = weakref.WeakSet()

# Sent through the step queue to end the applier's loop.
STOP = -1


class Applier:
  """Runs an aggregator's apply loop on the parameter servers.

  Args:
    serve: a `tf.function` taking an int64 scalar `limit`: 0 registers it
      and serves no step; otherwise it serves every announced step until
      `STOP`.
    scope: a context manager factory for the strategy's scope.
    send_stop: eager callable that enqueues `STOP` for the loop.
  """

  def __init__(self, serve, scope, send_stop):
    self._serve = serve
    self._scope = scope
    self._send_stop = send_stop
    self.error = None
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name="gba-applier")

  def start(self) -> None:
    """Registers the function with the cluster here, then runs it in a thread.

    Registering a function with the remote context from another thread can
    deadlock against the coordinator's closures (they may be waiting for
    this very applier); a call that serves no step registers it from the
    calling thread first.
    """
    with tf.init_scope(), self._scope():
      self._serve(tf.constant(0, tf.int64))
    _RUNNING.add(self)
    self._thread.start()

  def _run(self) -> None:
    try:
      with self._scope():
        self._serve(tf.constant(-1, tf.int64))
    except Exception as e:  # pylint: disable=broad-except
      # The cluster went away (a lost PS, the end of a job): the
      # coordinator reports it to the training loop; nothing is left to
      # apply here.
      self.error = e
      logging.info("[gba] applier ended: %s", e)
    finally:
      _RUNNING.discard(self)

  @property
  def running(self) -> bool:
    return self._thread.is_alive()

  def stop(self, timeout: float = 10.0) -> None:
    """Ends the loop (after any step it is applying) and its thread."""
    if not self._thread.is_alive():
      return
    try:
      self._send_stop()
    except Exception as e:  # pylint: disable=broad-except
      logging.info("[gba] could not stop the applier: %s", e)
      return
    if self._thread is not threading.current_thread():
      self._thread.join(timeout)


@atexit.register
def stop_all() -> None:
  """Stops every running applier (at exit, or before a test switches
  clusters)."""
  for applier in list(_RUNNING):
    applier.stop()
