"""DINOv2 without registers: the paper's baseline. Same keys as ``dinov2_reg.py``.

  --config=configs/dinov2.py:variant=L/14    (registers=0, legacy pos-embed interpolation)
"""

import importlib.util
import os


def _dinov2_reg():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'dinov2_reg.py')
  spec = importlib.util.spec_from_file_location('vitreg_configs_dinov2_reg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None):
  return _dinov2_reg().get_config(arg, registers=0)
