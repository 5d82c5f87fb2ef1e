"""DINOv2 without registers: the paper's baseline. Same keys as ``dinov2_reg.py``.

  --config=configs/dinov2.py:variant=L/14    (registers=0, legacy pos-embed interpolation)
"""

import os

from vitreg_jax import config as config_lib


def get_config(arg: str | None = None):
  sibling = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'dinov2_reg.py')
  return config_lib.from_file(sibling, arg, registers=0)
