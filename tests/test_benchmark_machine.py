"""Benchmarks refuse a loaded machine (or say loudly that a run was loaded)."""

import argparse
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'experiments', 'benchmarks'))
import machine  # noqa: E402  pylint: disable=wrong-import-position


def _args(*argv):
  """Benchmark flags; glibc's malloc left alone, as this test process is not a benchmark."""
  parser = argparse.ArgumentParser()
  machine.add_arguments(parser)
  return parser.parse_args(('--default-malloc',) + argv)


def _load(monkeypatch, *values):
  values = iter(values)
  monkeypatch.setattr(os, 'getloadavg', lambda: (next(values), 0.0, 0.0))


def test_loaded_machine_is_refused(monkeypatch):
  _load(monkeypatch, 1.7)
  with pytest.raises(SystemExit, match=r'load average 1\.70 > 0\.3.*--allow-load'):
    machine.Quiet(_args())


def test_allowed_loaded_run_is_flagged(monkeypatch, capsys):
  _load(monkeypatch, 1.7, 2.0)
  machine.Quiet(_args('--allow-load')).report()
  assert 'load average: 1.70 before, 2.00 after' in capsys.readouterr().out
  _load(monkeypatch, 0.6, 0.7)
  machine.Quiet(_args('--allow-load', '--max-load', '0.5')).report()
  assert 'LOADED MACHINE: not a result' in capsys.readouterr().out


def test_quiet_run_reports_and_flags_load_from_elsewhere(monkeypatch, capsys):
  _load(monkeypatch, 0.1, 1.9)  # the benchmark itself keeps the cores busy: fine
  machine.Quiet(_args()).report()
  out = capsys.readouterr().out
  assert 'load average: 0.10 before, 1.90 after' in out and 'not a result' not in out
  assert "malloc: glibc's defaults" in out
  _load(monkeypatch, 0.1, os.cpu_count() + 1.0)
  machine.Quiet(_args()).report()
  assert 'something else ran' in capsys.readouterr().out
