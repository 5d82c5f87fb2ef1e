"""DeiT-III without registers: the paper's baseline. Same keys as ``deit3_reg.py``.

  --config=configs/deit3.py              ViT-B/16, ImageNet-21k recipe, no registers
  --config=configs/deit3.py:smoke
"""

import importlib.util
import os


def _deit3_reg():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'deit3_reg.py')
  spec = importlib.util.spec_from_file_location('vitreg_configs_deit3_reg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None):
  return _deit3_reg().get_config(arg, registers=0)
