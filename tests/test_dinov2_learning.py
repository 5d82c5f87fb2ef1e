"""The README's main job learns: no teacher collapse, kNN above random init at every late eval.

Runs the exact README command (``configs/dinov2_reg.py:smoke`` on the embedded
dataset, one CPU device, 600 steps) and the same network at random init
through ``--mode=eval --eval_random_init``, on the same val split and bank.

Collapse is a failing condition: DINO's uniform collapse shows as the
teacher's per-image entropy rising to ln K (the upstream teacher temperature
did that here: 5.35-5.45 of ln 256 = 5.55 from step ~100 on, with kNN at the
random-init level by 1200 steps), one-hot collapse as it falling to 0.

Measured here (jax 0.10.2, CPU, float32, deterministic): random init 18.4 /
21.5 / 21.9% top-1 for seeds 0/1/2 (6 classes, chance 16.7%; the test uses
seed 0); the trained run's teacher entropy 3.8-3.9 over the second half, kNN
23.8 / 25.0 / 26.6 / 27.0% at steps 150-600. With upstream's teacher
temperature the entropy sits at 5.3-5.4 and kNN falls to 21.5% by step 1050
(README, "The quickstart's result"). The asserted margins sit between.
"""

import json
import math
import os

import pytest

import analysis_testing
import main_testing

PROTOTYPES = 256                 # the smoke preset's K
ENTROPY_BELOW_UNIFORM = 1.0      # nats below ln K over the whole second half (measured: ~1.7)
ENTROPY_ABOVE_ONE_HOT = 1.0      # nats above 0 (measured: >= 3.2 after warmup)
LATE_EVAL_MARGIN_POINTS = 3.0    # every eval of the second half over random init (measured: 5.1-5.5)


@pytest.mark.slow
def test_smoke_training_learns_without_collapse(tmp_path):
  workdir = str(tmp_path)
  knn, trained, baseline, records = main_testing.train_then_evaluate(
      'configs/dinov2_reg.py:smoke', workdir, 'knn_top1')
  last_step = max(r['step'] for r in records)
  entropy = {r['step']: r['teacher_entropy'] for r in records if 'teacher_entropy' in r}

  late_entropy = [v for s, v in entropy.items() if s > last_step / 2]
  assert late_entropy, entropy
  assert max(late_entropy) <= math.log(PROTOTYPES) - ENTROPY_BELOW_UNIFORM, (
      f'teacher collapsed to uniform: entropy {late_entropy} vs ln K {math.log(PROTOTYPES):.2f}')
  assert min(late_entropy) >= ENTROPY_ABOVE_ONE_HOT, f'teacher collapsed to one-hot: {late_entropy}'

  # learning is not a transient: every eval of the second half beats random init
  late_knn = {s: v for s, v in knn.items() if s > last_step / 2}
  assert len(late_knn) >= 2, knn
  for step, value in late_knn.items():
    assert value >= baseline['knn_top1'] + LATE_EVAL_MARGIN_POINTS, (step, knn, baseline)
  # the loop's own final evaluation agrees with the re-evaluated checkpoint
  assert knn[last_step] == pytest.approx(trained['knn_top1'])
  for fmt in ('vitreg/config.json', 'hf/config.json', 'timm_model.safetensors',
              'dinov2_backbone.pth'):
    assert os.path.exists(os.path.join(workdir, 'export', fmt)), fmt
  check_analyses_of_the_export(workdir, trained['knn_top1'])


# The smoke run's data: 48-px embedded images, evaluated as 36 -> 32 centre crops.
SMOKE_DATA = ['--embedded', 'image_size=48', '--embedded', 'num_classes=6', '--embedded',
              'num_val=256', '--embedded', 'num_train=1024']
SMOKE_CROP = ['--size', '32', '--resize', '36']


def check_analyses_of_the_export(workdir, loop_knn):
  """Every analysis CLI on the trained export; kNN reproduces the loop's number; LOST is
  reported next to the same network at random init (measured: 15.6% vs 15.2-21.5% for
  seeds 0-2, so the smoke model is not object-centric yet; pixels reach 35.9%, test_lost)."""
  run = lambda name, *args: analysis_testing.experiment(name).main(
      ['--model', f'workdir:{workdir}', *SMOKE_DATA, *args])
  out = os.path.join(workdir, 'analyses')
  read = lambda *path: json.load(open(os.path.join(out, *path), encoding='utf-8'))
  run('knn', *SMOKE_CROP, '--ks', '10', '20', '--out', f'{out}/knn')
  assert max(r['top1'] for r in read('knn', 'knn.json')['top1']) == pytest.approx(loop_knn)
  run('lost', '--out', f'{out}/lost')
  run('lost', '--random-init', '--out', f'{out}/lost_random')
  corloc = {name: read(name, 'lost.json')['settings'][0]['CorLoc'] for name in ('lost', 'lost_random')}
  print(f'LOST CorLoc on the embedded val split: trained {corloc["lost"]:.1f}%, '
        f'random init {corloc["lost_random"]:.1f}%')
  assert all(0 <= v <= 100 for v in corloc.values())
  run('artifacts', *SMOKE_CROP, '--out', f'{out}/artifacts')
  assert read('artifacts', 'artifacts.json')['images'] == 256
  run('attention_maps', *SMOKE_CROP, '--figures', '2', '--out', f'{out}/attention')
  run('linear_probe', *SMOKE_CROP, '--epochs', '5', '--out', f'{out}/linear')
  run('token_probes', *SMOKE_CROP, '--epochs', '5', '--out', f'{out}/tokens')
  assert read('linear', 'linear_probe.json')['eval_images'] == 256
