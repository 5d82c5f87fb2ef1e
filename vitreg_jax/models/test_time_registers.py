"""Test-time registers on a ViT: the neuron-list file, the shipped lists, applying them.

A list is a small JSON file (``save``; found by :mod:`vitreg_jax.analysis.register_neurons`)
or a shipped name (``SHIPPED``: DINOv2 ViT-L/14's curated 45 neurons, for the
plain ``dinov2_vitl14`` weights). ``apply(model, spec)`` returns the model with
the test-time tokens and the per-layer neuron edit (``layers.NeuronEdit``).
"""

import importlib.resources
import json
import os

SHIPPED = ('dinov2_vitl14',)
FORMAT = 'vitreg_jax test-time registers'


def save(path: str, layers: dict, *, num_tokens: int = 1, scale: float = 1.0,
         mode: str = 'zero', found_with: dict | None = None) -> None:
  """The neuron list as a small JSON file."""
  data = {'format': FORMAT, 'layers': {str(k): list(map(int, v)) for k, v in layers.items()},
          'num_tokens': num_tokens, 'scale': scale, 'mode': mode,
          'found_with': found_with or {}}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(data, f, indent=1)


def load(spec: str) -> dict:
  """A saved file or a shipped name -> ``{'layers': {int: [int]}, 'num_tokens', 'scale',
  'mode'}``."""
  if spec in SHIPPED:
    text = importlib.resources.files('vitreg_jax.models').joinpath(
        f'data/tt_registers/{spec}.json').read_text(encoding='utf-8')
  elif os.path.exists(spec):
    with open(spec, encoding='utf-8') as f:
      text = f.read()
  else:
    raise ValueError(f'test-time registers {spec!r}: no such file, and not a shipped list '
                     f'({", ".join(SHIPPED)})')
  data = json.loads(text)
  if data.get('format') != FORMAT or 'layers' not in data:
    raise ValueError(f'{spec}: not a test-time register file (expected "format": "{FORMAT}" '
                     'and "layers")')
  data['layers'] = {int(k): [int(n) for n in v] for k, v in data['layers'].items()}
  return data


def apply(model, spec: str | dict, **changes):
  """``model`` with the test-time tokens and neuron edit of ``spec`` (file, name or dict);
  ``changes`` override ``num_tokens``/``scale``/``mode``."""
  data = dict(load(spec) if isinstance(spec, str) else spec, **changes)
  neurons = tuple((int(l), tuple(int(n) for n in v)) for l, v in sorted(data['layers'].items()))
  return model.clone(num_test_time_registers=int(data.get('num_tokens', 1)),
                     register_neurons=neurons, neuron_scale=float(data.get('scale', 1.0)),
                     neuron_mode=data.get('mode', 'zero'))
