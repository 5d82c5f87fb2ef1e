"""CLIP without registers: the paper's baseline. Same keys as ``clip_reg.py``.

  --config=configs/clip.py               OpenCLIP ViT-B/16, no registers, batch 32k
  --config=configs/clip.py:smoke
"""

import os

from vitreg_jax import config as config_lib


def get_config(arg: str | None = None):
  sibling = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'clip_reg.py')
  return config_lib.from_file(sibling, arg, registers=0)
