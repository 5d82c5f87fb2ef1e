"""What every analysis CLI in ``experiments/`` shares: the model, the images, the output folder.

Models: any checkpoint the converter reads (``vitreg:``, ``dinov2:``, ``timm:``,
``hf:``, ``open_clip:`` — see :mod:`vitreg_jax.convert`) or ``workdir:PATH``,
a training run's exported backbone (``PATH/export/vitreg``); ``--random-init``
keeps the architecture and draws fresh weights (the untrained baseline).
Images: ``--data embedded`` (the built-in shapes, with boxes), ``tfds:NAME``
(``tfds.data_source``, prepared ArrayRecord) or ``folder:PATH``; resized and
centre-cropped (``--size``), or at native resolution padded to the patch
multiple (LOST). Feature passes run data-parallel over every local device.
"""

import argparse
import io
import json
import os

import jax
import ml_collections
import numpy as np
from PIL import Image

from vitreg_jax import convert, cpu_memory
from vitreg_jax.data import pipeline, sources, transforms
from vitreg_jax.models import test_time_registers
from vitreg_jax.models.vit import VisionTransformer
from vitreg_jax.parallel import mesh as mesh_lib
from vitreg_jax.parallel import rules as rules_lib

MEANS = {'imagenet': (transforms.IMAGENET_MEAN, transforms.IMAGENET_STD),
         'openai': (transforms.CLIP_MEAN, transforms.CLIP_STD)}


def parser(description: str, native: bool = False) -> argparse.ArgumentParser:
  """An ``argparse`` parser with the shared model, data and output options."""
  p = argparse.ArgumentParser(description=description,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  m = p.add_argument_group('model')
  m.add_argument('--model', required=True, metavar='FORMAT:PATH',
                 help=f'checkpoint; FORMAT in {sorted(convert.FORMATS) + ["workdir"]} '
                      '(workdir: a training run, its export/vitreg is read)')
  m.add_argument('--arch', help='architecture name where the format carries none (e.g. '
                 'vitl14_reg; for open_clip an OpenCLIP model name); else inferred from shapes')
  m.add_argument('--override', action='append', type=convert.arch.parse_override, default=[],
                 metavar='KEY=VALUE',
                 help='a VisionTransformer field, e.g. attention_impl=xla')
  m.add_argument('--tt-registers', metavar='FILE|NAME',
                 help='test-time registers: a neuron list from experiments/test_time_registers.py '
                      f'find, or a shipped one ({", ".join(test_time_registers.SHIPPED)})')
  m.add_argument('--random-init', action='store_true',
                 help='same architecture, fresh random weights (the untrained baseline)')
  m.add_argument('--seed', type=int, default=0, help='seed of --random-init and of sampling')
  d = p.add_argument_group('images')
  d.add_argument('--data', default='embedded', metavar='embedded|tfds:NAME|folder:PATH',
                 help='image source: the built-in shapes dataset (with boxes), a prepared tfds '
                      'dataset (e.g. tfds:voc/2007), or a folder of images (class subfolders '
                      'give labels)')
  d.add_argument('--split', default='val', help="split ('train', 'val', tfds splits such as "
                 "'train+validation')")
  d.add_argument('--data-dir', default=None, help='tfds data dir (default $TFDS_DATA_DIR)')
  d.add_argument('--tfds-image-decoding', choices=('ours', 'tfds'), default='ours',
                 help='ours: robust decoding of the stored bytes; tfds: let tfds decode '
                      '(needed under tfds.testing.mock_data)')
  d.add_argument('--embedded', action='append', type=convert.arch.parse_override, default=[],
                 metavar='KEY=VALUE',
                 help='embedded dataset field, e.g. image_size=48 num_classes=6')
  d.add_argument('--max-images', type=int, default=0, help='stop after this many (0: all)')
  d.add_argument('--batch-size', type=int, default=32,
                 help='images per feature pass (rounded up to the device count)')
  d.add_argument('--mean-std', choices=sorted(MEANS), default='imagenet',
                 help='input normalisation (openai for CLIP models)')
  if native:
    d.add_argument('--max-size', type=int, default=0,
                   help='bound the longer side (0: native resolution, as LOST)')
  else:
    d.add_argument('--size', type=int, default=224, help='input size (centre crop)')
    d.add_argument('--resize', type=int, default=0,
                   help='shorter side before the crop (0: --size, i.e. the central square)')
  p.add_argument('--out', required=True, help='output folder (JSON, PNG figures, results.md)')
  return p


def load_model(args):
  """``(model, variables)`` for ``args.model`` (+ ``--random-init``)."""
  spec = args.model
  fmt, _, path = spec.partition(':')
  if fmt == 'workdir':
    export = os.path.join(path, 'export', 'vitreg')
    if not os.path.exists(os.path.join(export, 'config.json')):
      raise convert.ConversionError(
          f'{spec}: no exported backbone at {export}; run python -m vitreg_jax.main '
          f'--mode=export --workdir={path}')
    spec = f'vitreg:{export}'
  model, variables = convert.load(spec, arch=args.arch, tt_registers=args.tt_registers,
                                  **dict(args.override))
  if args.random_init:
    variables = random_variables(model, args.seed)
  return model, variables


def random_variables(model: VisionTransformer, seed: int = 0) -> dict:
  """Fresh (unboxed) parameters of ``model``'s architecture."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  size = model.img_size
  boxed = jax.jit(model.init)(jax.random.key(seed), np.zeros((1, size, size, 3), np.float32))
  return {'params': nn.meta.unbox(boxed['params'])}


def data_config(args, batch_size: int, patch_size: int) -> ml_collections.ConfigDict:
  """The ``config.data`` / ``augment`` the eval pipeline reads, from the command line."""
  kind, _, name = args.data.partition(':')
  data = dict(source=kind, name='', path='', split=args.split, eval_split=args.split,
              data_dir=args.data_dir, batch_size=batch_size, eval_batch_size=batch_size,
              num_workers=0, embedded=dict(args.embedded),
              tfds_image_decoding=args.tfds_image_decoding)
  if kind == 'tfds':
    data['name'] = name
  elif kind == 'folder':
    data['path'] = name
  elif kind != 'embedded' or name:
    raise ValueError(f'--data {args.data!r}: expected embedded, tfds:NAME or folder:PATH')
  mean, std = MEANS[args.mean_std]
  augment = dict(mean=mean, std=std, native_max_size=getattr(args, 'max_size', 0) or None)
  if hasattr(args, 'size'):
    augment.update(eval_crop_size=args.size, eval_resize_size=args.resize or args.size)
  return ml_collections.ConfigDict(dict(data=data, augment=augment,
                                        masking=dict(patch_size=patch_size)))


def copy_args(args, **changes) -> argparse.Namespace:
  """``args`` with some options changed (e.g. another split)."""
  return argparse.Namespace(**{**vars(args), **changes})


def source(args):
  """The raw record source (for boxes and labels by index)."""
  config = data_config(args, 1, 14)
  return sources.make_source(config.data, args.split)


def mesh_and_rules():
  """Every local device on the batch axis; parameters replicated."""
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  return mesh, rules_lib.get_rules('dp')


def batches(args, model, mesh, mode: str = 'center'):
  """The evaluation pipeline over ``--data`` (``mode='native'``: one image at a time)."""
  devices = 1 if mesh is None else mesh.size
  batch = -(-max(args.batch_size, 1) // devices) * devices if mode == 'center' else 1
  config = data_config(args, batch, model.patch_size)
  return pipeline.build_eval_pipeline(config, split=args.split, mode=mode,
                                      mesh=mesh if mode == 'center' else None)


def image_size(record) -> tuple[int, int]:
  """(height, width) of a source record's image, reading only the header of encoded bytes."""
  image = record['image']
  if isinstance(image, np.ndarray):
    return image.shape[:2]
  if isinstance(image, str):
    with Image.open(image) as im:
      return im.height, im.width
  with Image.open(io.BytesIO(image)) as im:
    return im.height, im.width


def crop_boxes(boxes, size_hw: tuple[int, int], resize: int, crop: int) -> np.ndarray:
  """Normalised boxes of the original image -> normalised in the resized, centre-cropped one."""
  h, w = size_hw
  scale = resize / min(h, w)
  off_x, off_y = (round(w * scale) - crop) / 2, (round(h * scale) - crop) / 2
  b = np.asarray(boxes, np.float64).reshape(-1, 4) * (w * scale, h * scale, w * scale, h * scale)
  b = (b - (off_x, off_y, off_x, off_y)) / crop
  return np.clip(b, 0, 1)


def write_json(out: str, name: str, results) -> str:
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, name)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1, default=_jsonable)
  return path


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f'not JSON serialisable: {type(x).__name__}')


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  """A markdown table of ``rows`` (floats to 4 significant digits)."""
  def cell(v):
    if isinstance(v, float):
      return f'{v:.4g}'
    return '' if v is None else str(v)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(r.get(c)) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def write_markdown(out: str, title: str, body: str) -> str:
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, 'results.md')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(f'# {title}\n\n{body}')
  return path


def run(main, argv=None) -> int:
  """``main(argv)``, with a bad input (a missing file, a wrong option value, a checkpoint that
  does not fit) reported in one line on stderr and exit status 2 instead of a traceback."""
  import sys  # pylint: disable=import-outside-toplevel
  try:
    return main(argv)
  except (convert.ConversionError, ValueError, FileNotFoundError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


def run_as_script(main) -> None:
  """An experiment's ``__main__``: the CPU malloc settings of the main job, then ``run``."""
  import sys  # pylint: disable=import-outside-toplevel
  cpu_memory.keep_buffers_mapped()
  sys.exit(run(main))
