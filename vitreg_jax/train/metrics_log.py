"""Where metrics go: a JSONL file, TensorBoard event files, and the console.

Only process 0 writes files and prints (every process holds the same global
metrics). TensorBoard events are written with tensorboardX, so no TensorFlow
is needed. The console gets the progress line, evaluations and a final
summary on stdout, whatever the log verbosity (``main`` keeps third-party
INFO logs off unless ``--verbosity=1``).
"""

import json
import math
import os

from absl import logging
import jax
import numpy as np


def _scalar(value) -> float:
  return float(np.asarray(value))


class MetricWriter:
  """Appends ``{'step': s, **metrics}`` lines to ``workdir/metrics.jsonl``."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:
        logging.warning('tensorboardX is not installed: no TensorBoard events')

  def write(self, step: int, metrics: dict) -> None:
    if not self._active:
      return
    scalars = {k: _scalar(v) for k, v in metrics.items()}
    record = {'step': int(step)}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{secs:02d}s'


def progress(line: str) -> None:
  """A console line from process 0 (stdout, flushed: visible in pod logs as it happens)."""
  if jax.process_index() == 0:
    print(line, flush=True)


def summary(headline: str, places: dict[str, str], written: dict[str, list[str]],
            next_commands: dict[str, str] = ()) -> None:
  """Where the run's results went (checkpoints, metrics, each export's files) and what to run next."""
  lines = [headline]
  width = max(map(len, [*places, *(f'export {n}' for n in written)]), default=0) + 1
  lines += [f'  {name + ":":{width}} {where}' for name, where in places.items()]
  lines += [f'  {"export " + name + ":":{width}} ' + ', '.join(paths)
            for name, paths in written.items()]
  if next_commands:
    lines.append('next:')
    lines += [f'  {what}: {command}' for what, command in dict(next_commands).items()]
  progress('\n'.join(lines))


def progress_line(step: int, total: int, metrics: dict, keys, images_per_second: float,
                  eta_seconds: float, mfu: float | None, skipped: int) -> str:
  """``step 100/300 | loss 10.54 dino_global 1.09 ... | 310 img/s | ETA 1m05s ...``.

  ``keys`` are the recipe's progress keys (``Recipe.progress_keys``), shown
  after ``loss`` when the step reports them.
  """
  shown = ['loss'] + [k for k in keys if k != 'loss']
  values = ' '.join(f'{k} {_scalar(metrics[k]):.4g}' for k in shown if k in metrics)
  parts = [f'step {step}/{total}', values]
  parts.append(f'{images_per_second:.1f} img/s')
  parts.append(f'ETA {format_duration(eta_seconds)}')
  if mfu is not None:
    parts.append(f'MFU {100 * mfu:.1f}%')
  parts.append(f'skipped images {skipped}')
  return ' | '.join(parts)
