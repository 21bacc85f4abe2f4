"""Ports for local clusters: picked outside the ephemeral range, reserved
against concurrent pickers, never one a process already listens on."""

import multiprocessing
import os
import random
import socket
import time
from unittest import mock

import tensorflow as tf

from gba_tf.launch import tasks


def _pick_in_child(directory, seed, queue):
  with mock.patch.object(tasks, "_reservation_dir", lambda: directory):
    queue.put(tasks.pick_unused_ports(8, random.Random(seed)))


class PickUnusedPortsTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.directory = self.get_temp_dir()
    for name in os.listdir(self.directory):
      os.unlink(os.path.join(self.directory, name))
    patcher = mock.patch.object(tasks, "_reservation_dir",
                                lambda: self.directory)
    patcher.start()
    self.addCleanup(patcher.stop)

  def test_ports_are_distinct_and_outside_the_ephemeral_range(self):
    low, high = tasks._ephemeral_range()
    ports = tasks.pick_unused_ports(50)
    self.assertLen(set(ports), 50)
    for port in ports:
      self.assertFalse(low <= port <= high, port)
      self.assertBetween(port, tasks._MIN_PORT, 65535)

  def test_concurrent_pickers_with_the_same_draws_get_disjoint_ports(self):
    # Two processes drawing the same random sequence would pick the same
    # 8 ports; the reservation files make the later one skip them.
    queue = multiprocessing.get_context("spawn").Queue()
    children = [multiprocessing.get_context("spawn").Process(
        target=_pick_in_child, args=(self.directory, 7, queue))
                for _ in range(2)]
    for child in children:
      child.start()
    first, second = queue.get(timeout=60), queue.get(timeout=60)
    for child in children:
      child.join(60)
    self.assertLen(set(first) | set(second), 16)

  def test_same_draws_later_skip_reserved_ports(self):
    first = tasks.pick_unused_ports(4, random.Random(3))
    second = tasks.pick_unused_ports(4, random.Random(3))
    self.assertEmpty(set(first) & set(second))

  def test_stale_reservation_is_reclaimed(self):
    first = tasks.pick_unused_ports(1, random.Random(5))
    old = time.time() - tasks._PORT_RESERVATION_S - 1
    os.utime(os.path.join(self.directory, str(first[0])), (old, old))
    self.assertEqual(tasks.pick_unused_ports(1, random.Random(5)), first)

  def test_port_with_a_listener_is_skipped(self):
    port = tasks.pick_unused_ports(1, random.Random(11))[0]
    os.unlink(os.path.join(self.directory, str(port)))  # Reservation gone.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
      listener.bind(("127.0.0.1", port))
      listener.listen()
      self.assertNotIn(port, tasks.pick_unused_ports(1, random.Random(11)))


if __name__ == "__main__":
  tf.test.main()
