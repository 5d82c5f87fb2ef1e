"""Attention maps of CLS and registers over the patch grid (paper Fig. 1, 9).

The feature pass's ``prefix_attention [B, H, P, N]`` (last block, rows of the
``P = cls + registers (+ test-time registers)`` tokens, columns of the ``N`` patches) reshaped to
maps ``[B, P, H, gh, gw]``. A row of the full attention sums to one over all
tokens; the patch columns of a register row sum to what the register does
not give to cls and registers.
"""

import numpy as np


def token_names(model) -> list[str]:
  """``['cls', 'reg0', ..., 'tt0', ...]`` in token order (``tt``: test-time registers)."""
  return ((['cls'] if model.class_token else []) + [f'reg{i}' for i in range(model.num_registers)]
          + [f'tt{i}' for i in range(model.num_test_time_registers)])


def maps(prefix_attention, grid: tuple[int, int]) -> np.ndarray:
  """``[B, H, P, N]`` -> ``[B, P, H, gh, gw]``."""
  a = np.asarray(prefix_attention)
  b, h, p, n = a.shape
  if n != grid[0] * grid[1]:
    raise ValueError(f'{n} patch columns do not make a {grid[0]} x {grid[1]} grid')
  return a.transpose(0, 2, 1, 3).reshape(b, p, h, *grid)


def entropy(grid_maps) -> np.ndarray:
  """Entropy (nats) of each map renormalised over the patches: ``[B, P, H]``."""
  m = np.asarray(grid_maps, np.float64)
  m = m.reshape(*m.shape[:3], -1)
  m = m / np.maximum(m.sum(-1, keepdims=True), 1e-30)
  return -(m * np.log(np.maximum(m, 1e-30))).sum(-1)
