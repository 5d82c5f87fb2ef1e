"""CLIP's byte-level BPE tokenizer, without torch or open_clip at runtime.

Produces the same ids as OpenAI CLIP / OpenCLIP (REFERENCE §4): vocabulary 49408
= 256 byte symbols + 256 end-of-word byte symbols + 48894 merges + 2 specials,
``<start_of_text>`` 49406, ``<end_of_text>`` 49407, pad 0, context 77, text
cleaned with ftfy, HTML-unescaped, whitespace-collapsed and lower-cased.

The merges file (``bpe_simple_vocab_16e6.txt.gz``, from OpenAI CLIP, MIT
licence) ships in this package as data; another copy can be passed by path.
"""

import functools
import gzip
import html
import os

import ftfy
import numpy as np
import regex

DEFAULT_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bpe_simple_vocab_16e6.txt.gz')
CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP (the file holds more)
START_OF_TEXT = '<start_of_text>'
END_OF_TEXT = '<end_of_text>'
_END_OF_WORD = '</w>'


@functools.lru_cache()
def byte_symbols() -> dict[int, str]:
  """Byte -> printable unicode symbol, so BPE never sees whitespace/control characters.

  Printable Latin-1 bytes map to themselves; the remaining 68 bytes map, in
  order, to code points 256, 257, ... The dict's order (printable bytes first)
  is the order of the first 256 vocabulary entries.
  """
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  table = {byte: chr(byte) for byte in printable}
  others = [byte for byte in range(256) if byte not in table]
  table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
  return table


def clean_text(text: str) -> str:
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return ' '.join(text.split()).lower()


class ClipTokenizer:
  """``tokenize(texts) -> int32 [n, context_length]``; ``encode``/``decode`` for single strings."""

  def __init__(self, bpe_path: str | None = None, context_length: int = CONTEXT_LENGTH):
    self.bpe_path = bpe_path or DEFAULT_BPE_PATH
    self.context_length = int(context_length)
    if self.context_length < 2:
      raise ValueError(f'context_length must be >= 2 (start + end tokens), got {context_length}')
    self._load()

  def _load(self):
    if not os.path.isfile(self.bpe_path):
      raise FileNotFoundError(f'CLIP BPE merges file not found: {self.bpe_path!r}')
    with gzip.open(self.bpe_path, 'rt', encoding='utf-8') as f:
      lines = f.read().split('\n')
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
      raise ValueError(f'{self.bpe_path!r} is not a CLIP merges file ({len(merges)} merges read)')
    symbols = list(byte_symbols().values())
    vocab = symbols + [s + _END_OF_WORD for s in symbols] + [a + b for a, b in merges]
    vocab += [START_OF_TEXT, END_OF_TEXT]
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.decoder = vocab
    self.ranks = {pair: rank for rank, pair in enumerate(merges)}
    self.sot_id, self.eot_id = self.encoder[START_OF_TEXT], self.encoder[END_OF_TEXT]
    self.vocab_size = len(vocab)
    self._pattern = regex.compile(
        rf"{START_OF_TEXT}|{END_OF_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
        regex.IGNORECASE)
    self._cache = {START_OF_TEXT: [START_OF_TEXT], END_OF_TEXT: [END_OF_TEXT]}

  def __getstate__(self):  # workers rebuild the tables instead of unpickling them
    return {'bpe_path': self.bpe_path, 'context_length': self.context_length}

  def __setstate__(self, state):
    self.bpe_path, self.context_length = state['bpe_path'], state['context_length']
    self._load()

  def _bpe(self, word: str) -> list[str]:
    """Greedy BPE: repeatedly merge every occurrence of the best-ranked adjacent pair."""
    if word in self._cache:
      return self._cache[word]
    parts = list(word[:-1]) + [word[-1] + _END_OF_WORD]
    while len(parts) > 1:
      ranked = [(self.ranks.get(pair, len(self.ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
      best_rank, best_at = min(ranked)
      if best_rank == len(self.ranks):
        break
      first, second = parts[best_at], parts[best_at + 1]
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    if len(self._cache) < 100_000:
      self._cache[word] = parts
    return parts

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` without start/end tokens."""
    table = byte_symbols()
    ids = []
    for word in self._pattern.findall(clean_text(text)):
      symbols = ''.join(table[b] for b in word.encode('utf-8'))
      ids.extend(self.encoder[part] for part in self._bpe(symbols))
    return ids

  def decode(self, ids) -> str:
    """Text of ``ids``, skipping ``sot`` and stopping at ``eot`` (padding follows it)."""
    inverse = {s: b for b, s in byte_symbols().items()}
    tokens = []
    for i in map(int, ids):
      if i == self.eot_id:
        break
      if i != self.sot_id:
        tokens.append(self.decoder[i])
    text = ''.join(tokens)
    data = bytearray()
    for chunk in text.split(_END_OF_WORD):
      data.extend(inverse[c] for c in chunk)
      data.extend(b' ')
    return data.decode('utf-8', errors='replace').strip()

  def tokenize(self, texts, context_length: int | None = None) -> np.ndarray:
    """``[sot] + ids + [eot]``, truncated (keeping ``eot`` last) and zero-padded: int32 [n, ctx]."""
    if isinstance(texts, str):
      texts = [texts]
    length = context_length or self.context_length
    out = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
      ids = [self.sot_id] + self.encode(text) + [self.eot_id]
      if len(ids) > length:
        ids = ids[:length]
        ids[-1] = self.eot_id
      out[row, :len(ids)] = ids
    return out
