"""The CLIP tokenizer gives open_clip's ids without importing torch or open_clip itself."""

import gzip
import pickle
import subprocess
import sys

import numpy as np
import pytest

from vitreg_jax.data import tokenizer

STRINGS = [
    'a red circle above a small blue square',
    'A photo of a DOG.',
    "Hello, World!!  It's   me &amp; you &lt;3",
    'naïve café — 東京 🙂 résumé',
    '  leading and trailing\twhitespace\n',
    '1234567 3.14 2nd 10,000',
    "don't won't they'll we've I'm he'd",
    '<start_of_text>explicit special tokens<end_of_text>',
    'x' * 400,
    ' '.join(['word'] * 100),
    '',
    'ﬁancée’s “quotes” mojibake: Ã©',
]


@pytest.fixture(scope='module')
def tok():
  return tokenizer.ClipTokenizer()


def test_matches_open_clip_ids(tok):
  open_clip = pytest.importorskip('open_clip')
  expected = open_clip.tokenize(STRINGS).numpy()
  np.testing.assert_array_equal(tok.tokenize(STRINGS), expected)
  assert tok.tokenize(STRINGS).dtype == np.int32


def test_vocabulary_layout_follows_the_merges_file(tok):
  assert tok.vocab_size == 49408 and tok.sot_id == 49406 and tok.eot_id == 49407
  with gzip.open(tokenizer.DEFAULT_BPE_PATH, 'rt', encoding='utf-8') as f:
    lines = f.read().split('\n')
  first_merge, last_merge = lines[1].split(), lines[tokenizer.NUM_MERGES].split()
  assert tok.encoder[''.join(first_merge)] == 512  # after 256 bytes and 256 end-of-word bytes
  assert tok.encoder[''.join(last_merge)] == 49405
  assert tok.encoder['a</w>'] == 256 + list(tokenizer.byte_symbols()).index(ord('a'))


def test_truncation_padding_and_round_trip(tok):
  ids = tok.tokenize(['x' * 400, 'two words'], context_length=77)
  assert ids.shape == (2, 77)
  assert ids[0, 0] == tok.sot_id and ids[0, -1] == tok.eot_id
  assert list(ids[1, :4]) == [tok.sot_id, *tok.encode('two words'), tok.eot_id]
  assert np.all(ids[1, 4:] == 0)
  assert tok.decode(ids[1]) == 'two words'
  assert tok.decode(tok.tokenize('Hello, World!')[0]) == 'hello , world !'


def test_pickles_for_worker_processes(tok):
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.tokenize(STRINGS[:3]), tok.tokenize(STRINGS[:3]))
  assert len(pickle.dumps(tok)) < 1000  # the tables are rebuilt, not shipped


def test_no_torch_or_open_clip_at_runtime():
  code = ('import sys; from vitreg_jax.data import tokenizer; tokenizer.ClipTokenizer().tokenize("a");'
          'assert "torch" not in sys.modules and "open_clip" not in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True)
