"""Bad input: code-running pickles are refused, mismatches are named with the
expected shapes, and a failed conversion writes nothing."""

import os
import pickle
import subprocess
import sys

import convert_testing as ct
import pytest
import torch
from safetensors.torch import save_file

from vitreg_jax import convert
from vitreg_jax.convert import __main__ as cli
from vitreg_jax.convert import tensor_files


class _RunsCode:
  """Unpickling this calls ``exec``, which would create the marker file."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return exec, (f'open({self.marker!r}, "w").close()',)


@pytest.mark.parametrize('writer', ['torch.save', 'pickle.dump'])
def test_code_running_pickle_is_refused(writer, tmp_path):
  marker = tmp_path / 'code_ran'
  path = tmp_path / 'evil.pth'
  payload = {'cls_token': torch.zeros(1, 1, 4), 'payload': _RunsCode(marker)}
  if writer == 'torch.save':
    torch.save(payload, path)
  else:
    with open(path, 'wb') as f:
      pickle.dump(payload, f)
  with pytest.raises(convert.ConversionError, match='refused') as err:
    convert.load(f'dinov2:{path}')
  assert str(path) in str(err.value)
  assert not marker.exists()
  # The same file through the CLI: exit code 2, nothing run, nothing written.
  assert cli.main(['--from', f'dinov2:{path}', '--to', f'vitreg:{tmp_path}/out']) == 2
  assert not marker.exists() and not (tmp_path / 'out').exists()


@pytest.fixture(name='timm_state')
def _timm_state():
  return ct.timm_model('reg4').state_dict()


def _load_error(state, tmp_path, **kwargs) -> str:
  save_file(state, tmp_path / 'model.safetensors')
  with pytest.raises(convert.ConversionError) as err:
    convert.load(f'timm:{tmp_path}/model.safetensors', **kwargs)
  return str(err.value)


def test_misshaped_key_is_named_with_expected_shape(timm_state, tmp_path):
  timm_state['blocks.1.attn.proj.weight'] = torch.zeros(ct.WIDTH, ct.WIDTH + 2)
  message = _load_error(timm_state, tmp_path)
  assert 'blocks.1.attn.proj.weight: (384, 386), expected (384, 384)' in message
  assert 'mis-shaped (1)' in message


def test_missing_and_unexpected_keys_are_named(timm_state, tmp_path):
  del timm_state['blocks.0.norm2.bias']
  timm_state['fc_norm.weight'] = torch.ones(ct.WIDTH)
  message = _load_error(timm_state, tmp_path)
  assert 'missing (1)' in message and 'blocks.0.norm2.bias (expected (384,))' in message
  assert 'unexpected (1)' in message and 'fc_norm.weight (384,)' in message


def test_wrong_arch_says_which_shapes_disagree(timm_state, tmp_path):
  message = _load_error(timm_state, tmp_path, arch='vitb14_reg')
  assert 'vitb14_reg' in message
  assert 'blocks.0.attn.qkv.weight: (1152, 384), expected (2304, 768)' in message
  assert 'missing (140)' in message and 'blocks.2.norm1.weight (expected (768,))' in message
  assert 'its shapes suggest: custom (patch_size=14, embed_dim=384, depth=2, num_heads=6' in message


def test_non_standard_width_needs_heads(tmp_path):
  state = ct.timm_model('reg4', embed_dim=64, num_heads=4).state_dict()
  message = _load_error(state, tmp_path)
  assert 'num_heads' in message and 'embed_dim 64 is not a standard width' in message
  model, _ = convert.load(f'timm:{tmp_path}/model.safetensors', num_heads=4)
  assert (model.embed_dim, model.num_heads) == (64, 4)


def test_unknown_format_and_override_are_named(tmp_path):
  valid = r"FORMAT one of \['dinov2', 'hf', 'open_clip', 'timm', 'vitreg'\]"
  with pytest.raises(convert.ConversionError, match=valid):
    convert.load(f'onnx:{tmp_path}/x.bin')
  with pytest.raises(convert.ConversionError, match='expected FORMAT:PATH'):
    convert.load(f'{tmp_path}/x.bin')
  save_file(ct.timm_model('reg4').state_dict(), tmp_path / 'model.safetensors')
  with pytest.raises(convert.ConversionError, match=r"unknown model fields \['heads'\]"):
    convert.load(f'timm:{tmp_path}/model.safetensors', heads=3)


def test_failed_write_leaves_destination_untouched(timm_state, tmp_path, monkeypatch):
  save_file(timm_state, tmp_path / 'model.safetensors')
  model, variables = convert.load(f'timm:{tmp_path}/model.safetensors')
  existing = tmp_path / 'existing'
  existing.mkdir()
  (existing / 'config.json').write_text('old')

  def fail(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(tensor_files, 'write_json', fail)  # after the weights were written
  for dest in (tmp_path / 'new', existing):
    with pytest.raises(OSError, match='disk full'):
      convert.save(model, variables, f'hf:{dest}')
  assert not (tmp_path / 'new').exists()
  assert os.listdir(existing) == ['config.json'] and (existing / 'config.json').read_text() == 'old'
  assert sorted(os.listdir(tmp_path)) == ['existing', 'model.safetensors']  # no temp leftovers


def test_cli_converts_and_infers_the_architecture(timm_state, tmp_path):
  save_file(timm_state, tmp_path / 'model.safetensors')
  run = subprocess.run(
      [sys.executable, '-m', 'vitreg_jax.convert', '--from', f'timm:{tmp_path}/model.safetensors',
       '--to', f'vitreg:{tmp_path}/ours', '--weights', 'msgpack'],
      capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert run.returncode == 0, run.stderr
  assert 'from its shapes' in run.stderr and 'num_registers=4' in run.stderr
  assert sorted(os.listdir(tmp_path / 'ours')) == ['config.json', 'model.msgpack']
  model, _ = convert.load(f'vitreg:{tmp_path}/ours')
  assert (model.embed_dim, model.depth, model.num_registers) == (ct.WIDTH, ct.DEPTH, 4)


def test_cli_wrong_arch_fails_without_writing(timm_state, tmp_path, capsys):
  save_file(timm_state, tmp_path / 'model.safetensors')
  code = cli.main(['--from', f'timm:{tmp_path}/model.safetensors', '--to', f'hf:{tmp_path}/hf',
                   '--arch', 'vitl14_reg'])
  assert code == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'expected (3072, 1024)' in err
  assert not (tmp_path / 'hf').exists()
