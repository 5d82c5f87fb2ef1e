"""Every analysis CLI end to end on a random timm ViT converted on the fly (the way a user
runs them on downloaded weights), attention maps' invariants, and complete ``--help``."""

import argparse
import json
import os

import numpy as np
import pytest

from vitreg_jax.analysis import attention_maps, cli
from vitreg_jax.analysis.features import FeaturePass

import analysis_testing

CLIS = ('artifacts', 'attention_maps', 'lost', 'linear_probe', 'knn', 'token_probes',
        'register_ablation')
SIZE = ['--size', '48']


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  folder = tmp_path_factory.mktemp('timm')
  return {r: analysis_testing.timm_checkpoint(str(folder), r) for r in (0, 4)}


def test_attention_rows_sum_to_one_and_maps_have_the_grid_shape(checkpoints):
  args = argparse.Namespace(model=checkpoints[4], arch=None, override=[], random_init=False,
                            tt_registers=None)
  model, variables = cli.load_model(args)
  images = np.random.default_rng(0).normal(size=(2, 48, 48, 3)).astype(np.float32)
  out = FeaturePass(model, ('attention', 'prefix_attention'))(variables, images)
  full, prefix = np.asarray(out['attention']), np.asarray(out['prefix_attention'])
  np.testing.assert_allclose(full.sum(-1), 1.0, atol=1e-5)
  p = model.num_prefix_tokens
  np.testing.assert_array_equal(prefix, full[-1][:, :, :p, p:])
  maps = attention_maps.maps(prefix, (6, 6))
  assert maps.shape == (2, 1 + 4, model.num_heads, 6, 6)
  # cls row, head 1, patch (2, 3) == column p + 2 * 6 + 3 of the full attention
  assert maps[1, 0, 1, 2, 3] == full[-1][1, 1, 0, p + 15]
  assert attention_maps.token_names(model) == ['cls', 'reg0', 'reg1', 'reg2', 'reg3']


def test_attention_maps_cli_writes_figures(checkpoints, tmp_path):
  analysis_testing.experiment('attention_maps').main([
      '--model', checkpoints[4], '--out', str(tmp_path), '--figures', '2', '--per-head',
      '--max-images', '8', *SIZE, *analysis_testing.EMBEDDED])
  pngs = sorted(os.listdir(tmp_path / 'attention'))
  assert pngs == ['0000.png', '0001.png']
  assert all(os.path.getsize(tmp_path / 'attention' / f) > 5000 for f in pngs)
  saved = np.load(tmp_path / 'attention_maps.npz')
  assert saved['maps'].shape == (8, 5, 6, 6, 6) and list(saved['tokens'])[1] == 'reg0'
  rows = json.loads((tmp_path / 'attention.json').read_text())['maps']
  assert all(0 < r['entropy (nats, mean over heads)'] <= r['uniform'] + 1e-6 for r in rows)


@pytest.mark.parametrize('registers', [0, 4])
def test_lost_cli_on_the_embedded_boxes(checkpoints, tmp_path, registers):
  analysis_testing.experiment('lost').main([
      '--model', checkpoints[registers], '--out', str(tmp_path), '--layers', '-1', '-2',
      '--bias', '0', '-0.5', '--figures', '1', *analysis_testing.EMBEDDED])
  result = json.loads((tmp_path / 'lost.json').read_text())
  assert [(r['layer'], r['bias']) for r in result['settings']] == [
      (-1, 0.0), (-1, -0.5), (-2, 0.0), (-2, -0.5)]
  assert all(r['images'] == 64 for r in result['settings'])
  hits = [im['hit'] for im in result['per_image']]
  assert result['settings'][0]['CorLoc'] == pytest.approx(100 * np.mean(hits))
  assert result['compilations'] == 2  # 48 px images: one size, one program per layer
  assert os.path.getsize(tmp_path / 'boxes' / '0000.png') > 0


def test_linear_probe_knn_and_token_probe_clis(checkpoints, tmp_path):
  common = ['--model', checkpoints[4], *SIZE, *analysis_testing.EMBEDDED]
  analysis_testing.experiment('linear_probe').main(
      [*common, '--out', str(tmp_path / 'linear'), '--epochs', '2'])
  linear = json.loads((tmp_path / 'linear' / 'linear_probe.json').read_text())
  assert linear['train_images'] == 128 and linear['eval_images'] == 64
  assert [(r['n_last'], r['avgpool']) for r in linear['grid']] == [(1, False), (1, True)]
  analysis_testing.experiment('knn').main([*common, '--out', str(tmp_path / 'knn')])
  knn = json.loads((tmp_path / 'knn' / 'knn.json').read_text())
  assert [r['k'] for r in knn['top1']] == [10, 20, 100, 200]
  analysis_testing.experiment('token_probes').main(
      [*common, '--out', str(tmp_path / 'tokens'), '--epochs', '2', '--cutoff', '1e9'])
  tokens = json.loads((tmp_path / 'tokens' / 'token_probes.json').read_text())
  kinds = {(r['probe'], r['token']) for r in tokens['rows']}
  assert kinds == {('position', 'normal'), ('pixels', 'normal'), ('class', 'cls'),
                   ('class', 'normal')}  # a cutoff nobody reaches: no outlier rows


def test_register_ablation_tabulates_every_model(checkpoints, tmp_path):
  analysis_testing.experiment('register_ablation').main([
      '--out', str(tmp_path), '--models', checkpoints[0], checkpoints[4],
      '--analyses', 'artifacts', 'lost', '--', *SIZE, *analysis_testing.EMBEDDED,
      '--max-images', '16'])
  rows = json.loads((tmp_path / 'ablation.json').read_text())
  assert [r['registers'] for r in rows] == [0, 4]
  assert all('LOST CorLoc' in r and 'outlier %' in r for r in rows)
  assert os.path.getsize(tmp_path / 'ablation.png') > 0


@pytest.mark.parametrize('name', CLIS)
def test_help_documents_every_option(name, capsys):
  with pytest.raises(SystemExit) as exit_info:
    analysis_testing.experiment(name).main(['--help'])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  module = analysis_testing.experiment(name)
  parser_options = _options(module)
  for option in parser_options:
    assert option in text, option


def _options(module):
  """Every long option the CLI's parser defines, each required to carry a help text."""
  captured = {}
  original = argparse.ArgumentParser.parse_args

  def grab(self, args=None, namespace=None):
    captured['parser'] = self
    raise SystemExit(0)
  argparse.ArgumentParser.parse_args = grab
  try:
    with pytest.raises(SystemExit):
      module.parse_args([])
  finally:
    argparse.ArgumentParser.parse_args = original
  options = []
  for action in captured['parser']._actions:  # pylint: disable=protected-access
    if action.option_strings and action.dest != 'help':
      assert action.help, f'{action.option_strings} has no help text'
      options.append(action.option_strings[-1])
  return options


def test_bad_input_is_one_line_naming_the_problem(checkpoints, tmp_path, capsys):
  run = lambda name, *argv: cli.run(analysis_testing.experiment(name).main, list(argv))
  assert run('lost', '--model', 'timm:/nowhere/model.safetensors', '--out', str(tmp_path)) == 2
  assert '/nowhere/model.safetensors' in capsys.readouterr().err
  assert run('artifacts', '--model', checkpoints[4], '--data', 'imagenet', '--out',
             str(tmp_path)) == 2
  assert "--data 'imagenet': expected embedded, tfds:NAME or folder:PATH" in capsys.readouterr().err
  assert run('knn', '--model', 'workdir:' + str(tmp_path), '--out', str(tmp_path)) == 2
  assert '--mode=export' in capsys.readouterr().err
  assert run('attention_maps', '--model', checkpoints[4], '--tt-registers', 'nope.json',
             '--out', str(tmp_path)) == 2
  assert 'not a shipped list' in capsys.readouterr().err
  assert not os.listdir(tmp_path)  # nothing written
