"""MovieLens-100K loader on a small fixture written by the test."""

import os
import tempfile

import numpy as np
import tensorflow as tf

from gba_tf.data import movielens

_INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
1\t10\t5\t881250949
1\t20\t3\t881250950
2\t10\t4\t881250951
2\t30\t1\t881250952
3\t20\t4\t881250953
3\t99\t2\t881250954
"""
_USER = """user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token
1\t24\tM\ttechnician\t85711
2\t53\tF\tother\t94043
3\t33\tM\twriter\t32067
"""
_ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
10\tToy Story\t1995\tAnimation Children's Comedy
20\tGoldenEye\t1995\tAction Adventure Thriller
30\tFour Rooms\t1995\tThriller
"""


class MovieLensTest(tf.test.TestCase):

  def _fixture(self, inter=_INTER):
    d = tempfile.mkdtemp()
    for name, text in (("inter", inter), ("user", _USER), ("item", _ITEM)):
      with open(os.path.join(d, f"ml-100k.{name}"), "w") as f:
        f.write(text)
    return d

  def test_features_labels_and_vocabulary(self):
    data = movielens.load(self._fixture(), test_fraction=0.5, seed=0)
    ids = np.concatenate([data.train_ids, data.test_ids])
    labels = np.concatenate([data.train_labels, data.test_labels])
    self.assertEqual(ids.shape, (6, 8))
    self.assertEqual((len(data.train_ids), len(data.test_ids)), (3, 3))
    # Vocabulary sizes (+1 unknown id each): users 3+1, items 4+1 (99 has no
    # item row but is a rated item), age buckets {2,3,5}+1, gender 2+1,
    # occupation 3+1, zip prefixes {85,94,32}+1, decades {199}+1, first
    # genres {Animation, Action, Thriller}+1 (item 99: unknown).
    self.assertEqual(data.offsets, (0, 4, 9, 13, 16, 20, 24, 26, 30))
    self.assertEqual(data.vocab_size, 30)
    for f in range(8):
      self.assertAllInRange(ids[:, f], data.offsets[f],
                            data.offsets[f + 1] - 1)
    # Ratings 5,3,4,1,4,2 -> clicks where rating >= 4: 3 positives.
    self.assertEqual(sorted(labels.tolist()), [0, 0, 0, 1, 1, 1])
    # Item 99 has no item row: its decade and genre are the unknown ids.
    row = [i for i in range(6) if ids[i, 1] == data.offsets[1] + 4][0]
    self.assertEqual(ids[row, 6], data.offsets[6])
    self.assertEqual(ids[row, 7], data.offsets[7])

  def test_split_is_seeded_and_disjoint(self):
    d = self._fixture()
    a = movielens.load(d, test_fraction=0.5, seed=1)
    b = movielens.load(d, test_fraction=0.5, seed=1)
    c = movielens.load(d, test_fraction=0.5, seed=2)
    self.assertAllEqual(a.train_ids, b.train_ids)
    self.assertFalse(np.array_equal(a.train_ids, c.train_ids) and
                     np.array_equal(a.test_ids, c.test_ids))
    rows = {tuple(r) for r in a.train_ids} & {tuple(r) for r in a.test_ids}
    self.assertEmpty(rows)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, "test_fraction=1.5"):
      movielens.load(self._fixture(), test_fraction=1.5)
    bad = _INTER + "4\t10\n"
    with self.assertRaisesRegex(ValueError, "2 columns on line 8"):
      movielens.load(self._fixture(inter=bad))


if __name__ == "__main__":
  tf.test.main()
