"""DeiT-III without registers: the paper's baseline. Same keys as ``deit3_reg.py``.

  --config=configs/deit3.py              ViT-B/16, ImageNet-21k recipe, no registers
  --config=configs/deit3.py:smoke
"""

import os

from vitreg_jax import config as config_lib


def get_config(arg: str | None = None):
  sibling = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'deit3_reg.py')
  return config_lib.from_file(sibling, arg, registers=0)
