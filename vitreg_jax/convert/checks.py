"""Errors for bad checkpoints, naming every offending key with its expected shape."""

import re

_SHOWN = 12  # keys listed per category before "... and N more"


class ConversionError(ValueError):
  """A checkpoint or request that cannot be converted; the message says why."""


def natural_key(name: str):
  """Sort key that puts ``blocks.2`` before ``blocks.10``."""
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def _listing(title: str, rows: list[str]) -> list[str]:
  if not rows:
    return []
  shown = rows[:_SHOWN]
  more = [f'    ... and {len(rows) - _SHOWN} more'] if len(rows) > _SHOWN else []
  return [f'  {title} ({len(rows)}):'] + [f'    {r}' for r in shown] + more


def shape_mismatches(actual: dict, expected: dict) -> list[str]:
  """Lines describing missing, unexpected and mis-shaped keys (empty when all match)."""
  missing = sorted(set(expected) - set(actual), key=natural_key)
  unexpected = sorted(set(actual) - set(expected), key=natural_key)
  misshaped = sorted((k for k in set(actual) & set(expected)
                      if tuple(actual[k].shape) != tuple(expected[k].shape)), key=natural_key)
  return (
      _listing('mis-shaped', [f'{k}: {tuple(actual[k].shape)}, expected {tuple(expected[k].shape)}'
                              for k in misshaped])
      + _listing('missing', [f'{k} (expected {tuple(expected[k].shape)})' for k in missing])
      + _listing('unexpected', [f'{k} {tuple(actual[k].shape)}' for k in unexpected]))


def check_tensors(actual: dict, expected: dict, what: str, hint: str = '') -> None:
  """Raises ``ConversionError`` listing every key of ``actual`` that disagrees with ``expected``."""
  lines = shape_mismatches(actual, expected)
  if lines:
    raise ConversionError('\n'.join([f'{what}:'] + lines + ([hint] if hint else [])))
