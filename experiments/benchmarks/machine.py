"""The state of the machine a benchmark ran on: load before and after, and the matmul peak.

Ratios against a reference measured in the same run survive some load, but
absolute numbers and MFU do not (a busy core halves the measured peak and
flatters MFU). ``Quiet(args)`` refuses to start above ``--max-load`` (the
1-minute load average, default 0.3) unless ``--allow-load`` is given, and
``report()`` prints the load before and after and flags a run that ended
loaded, so a number taken while a compile or CI ran is never recorded as a
result.

It also applies the main job's CPU malloc settings (``vitreg_jax.cpu_memory``:
XLA's per-step temporaries stay mapped) to the whole process, reference
included, unless ``--default-malloc`` asks for glibc's defaults.
"""

import argparse
import os
import sys

from vitreg_jax import cpu_memory

MAX_LOAD = 0.3


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--max-load', type=float, default=MAX_LOAD,
                      help='refuse to start when the 1-minute load average is above this')
  parser.add_argument('--allow-load', action='store_true',
                      help='run anyway on a loaded machine (the output says so: not a result)')
  parser.add_argument('--default-malloc', action='store_true',
                      help="glibc's malloc defaults instead of the main job's CPU settings "
                           '(vitreg_jax/cpu_memory.py), which apply to both sides')


def load_average() -> float:
  return os.getloadavg()[0]


class Quiet:
  """Load before (checked at construction) and after (``report``)."""

  def __init__(self, args):
    self.max_load, self.allowed = args.max_load, args.allow_load
    self.malloc = ("glibc's defaults" if args.default_malloc or not cpu_memory.keep_buffers_mapped()
                   else 'buffers kept mapped (vitreg_jax.cpu_memory)')
    self.before = load_average()
    if self.before > self.max_load and not self.allowed:
      sys.exit(f'error: load average {self.before:.2f} > {self.max_load} (nothing else may run '
               'during a benchmark); wait for a quiet machine or pass --allow-load')

  def report(self) -> str:
    after = load_average()
    line = (f'malloc: {self.malloc}; load average: {self.before:.2f} before, {after:.2f} after '
            '(1-minute)')
    if self.before > self.max_load:
      line += '  ** LOADED MACHINE: not a result **'
    elif after > self.max_load + os.cpu_count():
      line += '  ** something else ran during the benchmark: not a result **'
    print(line)
    return line
