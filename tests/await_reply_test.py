"""A claiming push's wait for the applier (`accumulator._await_reply`).

Real TF queues, driven by hand in the order that hung a job: claimer C
claims step 5 and its chain ends at 5; claimer A then claims step 6; C's
push reaches its dequeue only after A's has.
"""

import threading

import gba_tf  # sets TF_USE_LEGACY_KERAS=1 before TensorFlow loads
import tensorflow as tf

from gba_tf import accumulator
from tests import testing_utils

_WAIT_S = 20.0


class AwaitReplyTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.replies = tf.queue.FIFOQueue(16, tf.int64, shapes=[[]])
    # A wait that never ends fails its test, then is cancelled here: closing
    # the queue fails the dequeues still pending.
    self.addCleanup(lambda: self.replies.close(cancel_pending_enqueues=True))
    self.wait = tf.function(lambda claim, step: accumulator._await_reply(  # pylint: disable=protected-access
        self.replies, claim, step))

  def _start(self, claim, step):
    """Runs one wait in a thread; returns (thread, result holder)."""
    result = {}

    def run():
      result["completed"] = bool(self.wait(tf.constant(claim),
                                           tf.constant(step, tf.int64)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result

  def _size(self):
    return int(self.replies.size())

  def test_a_claimer_late_to_its_reply_is_answered_by_the_next(self):
    self.replies.enqueue(tf.constant(5, tf.int64))  # C's chain ended at 5.
    a, a_result = self._start(True, 6)
    # A takes 5 (older than its step 6: dropped) and waits again.
    testing_utils.wait_while(self._size, _WAIT_S)
    self.assertEqual(self._size(), 0)
    self.assertTrue(a.is_alive())
    self.replies.enqueue(tf.constant(6, tf.int64))  # A's chain ended at 6.
    a.join(_WAIT_S)
    self.assertFalse(a.is_alive())
    self.assertEqual(a_result, {"completed": True})
    # 6 was put back: C (step 5) is answered by it. Taken for good, C
    # waited for a reply no chain would send.
    c, c_result = self._start(True, 5)
    c.join(_WAIT_S)
    self.assertFalse(c.is_alive(), "C still waits for its reply")
    self.assertEqual(c_result, {"completed": True})
    # 6 stays in the queue, once.
    self.assertEqual(self._size(), 1)

  def test_a_reply_left_behind_is_dropped_by_the_next_claim(self):
    # 6 left by a claimer that died waiting; the next claim is for step 7.
    self.replies.enqueue(tf.constant(6, tf.int64))
    e, e_result = self._start(True, 7)
    testing_utils.wait_while(self._size, _WAIT_S)
    self.assertEqual(self._size(), 0)
    self.assertTrue(e.is_alive())  # 6 does not answer step 7.
    self.replies.enqueue(tf.constant(9, tf.int64))  # a chain 7..9
    e.join(_WAIT_S)
    self.assertEqual(e_result, {"completed": True})
    self.assertEqual(self._size(), 1)  # 9 put back (checked first: a
    self.assertEqual(int(self.replies.dequeue()), 9)  # dequeue would block)

  def test_a_push_that_did_not_claim_takes_nothing(self):
    self.replies.enqueue(tf.constant(4, tf.int64))
    completed = self.wait(tf.constant(False), tf.constant(8, tf.int64))
    self.assertFalse(bool(completed))
    self.assertEqual(self._size(), 1)


if __name__ == "__main__":
  tf.test.main()
