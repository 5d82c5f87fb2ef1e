"""Name and array-layout tables between two flat parameter dicts.

A converter is a list of ``(ours, theirs, layout)`` rows whose names may hold
``{i}`` (a block index) or ``{p}`` (``weight``/``bias``). The array code uses
only operations that numpy and jax share, so the same function converts real
arrays and, under ``jax.eval_shape``, computes the shapes a checkpoint must
have without allocating them (that is how mis-shaped keys are reported in the
checkpoint's own names).
"""

import dataclasses
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

_FIELDS = {'i': r'\d+', 'p': r'weight|bias'}


def xp(*arrays):
  """numpy, or jax.numpy when any input is traced (inside ``jax.eval_shape``)."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def concat(arrays, axis: int):
  return xp(*arrays).concatenate(arrays, axis=axis)


def zeros(shape, like):
  return xp(like).zeros(shape, like.dtype)


def ones(shape, like):
  return xp(like).ones(shape, like.dtype)


def shapes_of(fn, tensors: dict) -> dict:
  """``{name: shape}`` of ``fn(tensors)`` computed without allocating anything."""
  specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in tensors.items()}
  return {k: tuple(v.shape) for k, v in jax.eval_shape(fn, specs).items()}


def split3(x):
  """Splits the leading axis in three equal parts (packed q, k, v rows)."""
  n = x.shape[0] // 3
  return x[:n], x[n:2 * n], x[2 * n:]


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one tensor is stored on each side: ``to_ours(x, our_shape)``, ``from_ours(x)``."""
  name: str
  to_ours: Callable
  from_ours: Callable


SAME = Layout('same', lambda x, shape: x.reshape(shape), lambda x: x)
# A bias stored flat by torch and with head axes by us (qkv bias [3, H, hd]).
VECTOR = Layout('vector', lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1))
# torch Conv2d [O, I, kh, kw] <-> HWIO [kh, kw, I, O].
CONV = Layout('conv', lambda x, shape: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))


def linear(in_axes: int = 1) -> Layout:
  """torch Linear ``[out, in]`` <-> kernel ``[*in_axes, *out_axes]``.

  ``in_axes`` is how many leading kernel axes are inputs: 1 for ``qkv``
  (``[D, 3, H, hd]``), 2 for ``proj`` (``[H, hd, D]``).
  """
  return Layout(
      f'linear{in_axes}',
      lambda x, shape: x.T.reshape(shape),
      lambda x: x.reshape(math.prod(x.shape[:in_axes]), -1).T)


LINEAR = linear(1)


def _pattern(template: str) -> re.Pattern:
  parts = re.split(r'\{(\w)\}', template)
  regex = ''.join(re.escape(part) if k % 2 == 0 else f'(?P<{part}>{_FIELDS[part]})'
                  for k, part in enumerate(parts))
  return re.compile(f'^{regex}$')


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str
  theirs: str
  layout: Layout = SAME


class Table:
  """A readable two-way name map (plus layouts) between flat dicts.

  The left column (``Rule.ours``) is the side nearer our params: our names in
  ``dinov2.TABLE``, DINOv2 hub names in ``hf.RENAMES``.
  """

  def __init__(self, rules: tuple[Rule, ...]):
    self.rules = rules
    self._ours = [(_pattern(r.ours), r) for r in rules]
    self._theirs = [(_pattern(r.theirs), r) for r in rules]

  @staticmethod
  def _lookup(name, patterns, target):
    for pattern, rule in patterns:
      m = pattern.match(name)
      if m:
        return getattr(rule, target).format(**m.groupdict()), rule
    return None, None

  def theirs_name(self, ours_name: str):
    """``(their name, rule)`` for one of our names, or ``(None, None)``."""
    return self._lookup(ours_name, self._ours, 'theirs')

  def ours_name(self, theirs_name: str):
    return self._lookup(theirs_name, self._theirs, 'ours')
