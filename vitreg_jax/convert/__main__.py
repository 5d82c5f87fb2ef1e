"""CLI: ``python -m vitreg_jax.convert --from FORMAT:PATH --to FORMAT:PATH [--arch ARCH]``.

Examples::

  python -m vitreg_jax.convert --from dinov2:dinov2_vitl14_reg4_pretrain.pth --to vitreg:vitl14_reg
  python -m vitreg_jax.convert --from timm:model.safetensors --to hf:hf_folder --arch vitl14_reg
  python -m vitreg_jax.convert --from open_clip:ViT-B-16.pt --arch ViT-B-16 --to timm:visual
  python -m vitreg_jax.convert --from open_clip:ViT-B-16.pt --arch ViT-B-16 --to open_clip:out

From open_clip, --arch is an OpenCLIP model name (or JSON config); to any other
format the image tower is written, to open_clip both towers.
"""

import argparse
import logging
import sys

from vitreg_jax import convert


def parse_args(argv):
  formats = ', '.join(sorted(convert.FORMATS))
  parser = argparse.ArgumentParser(
      prog='python -m vitreg_jax.convert',
      description='Converts ViT (with registers) weights between vitreg_jax, DINOv2 hub, timm, '
                  'HF transformers and OpenCLIP formats. Nothing is written unless the conversion '
                  'succeeds.',
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='examples:' + __doc__.split('::', 1)[1])
  parser.add_argument('--from', dest='source', required=True, metavar='FORMAT:PATH',
                      help=f'checkpoint to read; FORMAT in {{{formats}}}')
  parser.add_argument('--to', dest='dest', required=True, metavar='FORMAT:PATH',
                      help=f'where to write; FORMAT in {{{formats}}}')
  parser.add_argument('--arch', help='architecture name (e.g. vitl14_reg; for open_clip an '
                      'OpenCLIP model name such as ViT-B-16) where the source format carries '
                      'none; inferred from the shapes when omitted')
  parser.add_argument('--override', action='append', type=convert.arch.parse_override,
                      default=[], metavar='KEY=VALUE',
                      help='a VisionTransformer field, e.g. num_heads=8')
  parser.add_argument('--weights', choices=sorted(convert.vitreg.WEIGHT_FILES),
                      help='weights file kind for --to vitreg:PATH (default safetensors)')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  options = {'weights': args.weights} if args.weights else {}
  try:
    if args.dest.partition(':')[0] == convert.open_clip.NAME:
      model, variables = convert.load_clip(args.source, arch=args.arch, **dict(args.override))
      convert.save_clip(model, variables, args.dest, **options)
    else:
      model, variables = convert.load(args.source, arch=args.arch, **dict(args.override))
      convert.save(model, variables, args.dest, **options)
  except convert.ConversionError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
