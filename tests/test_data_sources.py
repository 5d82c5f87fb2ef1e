"""Sources: the embedded dataset's content, folders, caption lists, tfds (mocked and real ArrayRecord)."""

import io
import json
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest
from scipy import ndimage
import tensorflow_datasets as tfds

import data_testing

from vitreg_jax.data import embedded
from vitreg_jax.data import pipeline
from vitreg_jax.data import sources




def _embedded(split='train', **kw):
  return sources.EmbeddedSource(split, **{'image_size': 48, 'num_train': 64, 'num_val': 16, **kw})


def test_embedded_is_deterministic_and_repr_names_content():
  a, b = _embedded(), _embedded()
  for i in (0, 17, 63):
    ra, rb = a[i], b[i]
    np.testing.assert_array_equal(ra['image'], rb['image'])
    assert ra['caption'] == rb['caption'] and ra['label'] == rb['label']
  assert repr(a) == repr(b)
  assert repr(a) != repr(_embedded(seed=1)) and repr(a) != repr(_embedded('val'))
  assert not np.array_equal(a[0]['image'], _embedded('val')[0]['image'])
  assert len(a) == 64 and len(_embedded('val')) == 16
  with pytest.raises(ValueError, match='num_classes'):
    _embedded(num_classes=9)
  with pytest.raises(ValueError, match='split'):
    _embedded('test')


def test_embedded_records_are_consistent():
  source = _embedded(image_size=64, num_train=200)
  labels = []
  for i in range(200):
    record = source[i]
    image, boxes = record['image'], record['boxes']
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    labels.append(record['label'])
    assert record['box_labels'][0] == record['label']
    assert embedded.SHAPES[record['label']] in record['caption'].split()[:3]
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2:] > boxes[:, :2])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert areas[0] == areas.max()  # the dominant (labelled) object comes first and is largest
  counts = np.bincount(labels, minlength=8)
  assert counts.min() > 10  # every class present, roughly balanced


def _saturation(image):
  image = image.astype(np.float32)
  return image.max(-1) - image.min(-1)


def test_embedded_supports_object_discovery_and_shape_classification():
  """The labelled object is salient (a trivial saliency box finds it), and colour says nothing."""
  source = _embedded(image_size=64, num_train=150)
  hits, colour_features, labels = 0, [], []
  for i in range(150):
    record = source[i]
    salient = _saturation(record['image']) > 90  # objects are saturated, backgrounds muted
    components, count = ndimage.label(salient)
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
    rows, cols = np.nonzero(components == largest)
    box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / 64
    truth = record['boxes'][0]
    inter = np.prod(np.clip(np.minimum(box[2:], truth[2:]) - np.maximum(box[:2], truth[:2]), 0, None))
    union = np.prod(box[2:] - box[:2]) + np.prod(truth[2:] - truth[:2]) - inter
    hits += inter / union >= 0.5
    histogram = np.histogramdd(record['image'].reshape(-1, 3), bins=4, range=[(0, 256)] * 3)[0]
    colour_features.append(histogram.ravel() / histogram.sum())
    labels.append(record['label'])
  assert hits / 150 > 0.8
  # Leave-one-out 1-NN on colour histograms stays near chance (1/8): the class is the shape.
  features = np.asarray(colour_features)
  distances = ((features[:, None] - features[None]) ** 2).sum(-1)
  np.fill_diagonal(distances, np.inf)
  accuracy = np.mean(np.asarray(labels)[distances.argmin(1)] == np.asarray(labels))
  assert accuracy < 0.3


def _write_png(path, colour=(10, 20, 30), size=(6, 5)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new('RGB', size, colour).save(path)


def test_image_folder(tmp_path):
  for name in ('b_cat', 'a_dog'):
    for i in range(3):
      _write_png(str(tmp_path / 'train' / name / f'{i}.png'))
  (tmp_path / 'train' / 'a_dog' / 'notes.txt').write_text('not an image')
  config = ml_collections.ConfigDict({'source': 'folder', 'path': str(tmp_path)})
  source = sources.make_source(config, 'train')  # picks root/train
  assert len(source) == 6 and source.classes == ['a_dog', 'b_cat'] and source.num_classes == 2
  assert [source[i]['label'] for i in range(6)] == [0, 0, 0, 1, 1, 1]
  assert source[4]['image'].endswith(os.path.join('b_cat', '1.png'))
  assert repr(source) == repr(sources.ImageFolderSource(str(tmp_path / 'train')))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='class sub-folders'):
    sources.ImageFolderSource(str(tmp_path / 'empty'))


def test_caption_lists(tmp_path):
  _write_png(str(tmp_path / 'img' / 'a.png'))
  _write_png(str(tmp_path / 'img' / 'b.png'))
  (tmp_path / 'train.jsonl').write_text(
      json.dumps({'path': 'img/a.png', 'caption': 'a dog'}) + '\n\n'
      + json.dumps({'path': 'img/b.png', 'caption': ['one', 'two']}) + '\n')
  (tmp_path / 'val.csv').write_text('path,caption\nimg/b.png,"a cat, sitting"\n')
  config = ml_collections.ConfigDict({'source': 'captions', 'path': str(tmp_path / '{split}.jsonl')})
  source = sources.make_source(config, 'train')
  assert len(source) == 2 and source[0]['caption'] == 'a dog' and source[1]['caption'] == ['one', 'two']
  assert source[0]['image'] == str(tmp_path / 'img' / 'a.png') and source[0]['label'] == -1
  csv_source = sources.CaptionListSource(str(tmp_path / 'val.csv'))
  assert csv_source[0]['caption'] == 'a cat, sitting'
  (tmp_path / 'bad.jsonl').write_text(json.dumps({'file': 'x.png', 'caption': 'y'}) + '\n')
  with pytest.raises(ValueError, match="lacks 'path'"):
    sources.CaptionListSource(str(tmp_path / 'bad.jsonl'))


def test_unknown_source_kind():
  with pytest.raises(ValueError, match='valid'):
    sources.make_source(ml_collections.ConfigDict({'source': 'webdataset'}), 'train')


def _tfds_config(trainer, **data):
  config = ml_collections.ConfigDict()
  config.kind, config.seed = trainer, 0
  config.data = dict(source='tfds', batch_size=4, **data)
  config.augment = dict(global_crops_size=28, local_crops_size=14, local_crops_number=2, image_size=28)
  return config


def test_tfds_mock_data_feeds_the_dinov2_pipeline():
  with tfds.testing.mock_data(num_examples=12):
    config = _tfds_config('multicrop', name='imagenet2012', tfds_image_decoding='tfds')
    iterator = data_testing.train_pipeline(config, process_index=0, process_count=1)
    batches = [next(iterator) for _ in range(4)]  # more than one epoch (12 / 4 = 3 batches)
    iterator.close()
    evaluation = pipeline.build_eval_pipeline(config, split='validation', process_index=0, process_count=1)
    eval_batches = list(evaluation)
  assert batches[0]['global_crops'].shape == (4, 2, 28, 28, 3)
  assert batches[0]['masks'].shape == (4, 2, 2, 2)
  assert all(0 <= label < 1000 for b in batches for label in b['label'])
  assert sorted(np.concatenate([b['index'] for b in batches[:3]])) == list(range(12))
  assert len(eval_batches) == 3 and eval_batches[0]['image'].shape == (4, 224, 224, 3)


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
  """A real ArrayRecord tfds dataset, built here without TensorFlow from encoded JPEGs."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=3),
        'objects': tfds.features.Sequence({'bbox': tfds.features.BBoxFeature()}),
        'captions': tfds.features.Sequence({'text': tfds.features.Text()}),
    }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(8):
      buffer = io.BytesIO()
      Image.new('RGB', (30 + i, 20), (i * 30, 50, 90)).save(buffer, 'JPEG')
      yield i, {'image': buffer.getvalue(), 'label': i % 3,
                'objects': {'bbox': [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)]},
                'captions': {'text': [f'caption {i}', f'other {i}']}}


@pytest.fixture(scope='module')
def tiny_tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  TinyCaptions(data_dir=data_dir, file_format='array_record').download_and_prepare(
      download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return data_dir


def test_tfds_array_record_raw_bytes_boxes_captions(tiny_tfds_dir):
  source = sources.TfdsSource('tiny_captions', 'train', tiny_tfds_dir)
  assert len(source) == 8 and source.num_classes == 3
  record = source[0]
  assert isinstance(record['image'], bytes)  # decoded by our robust decoder, not by tfds
  np.testing.assert_allclose(record['boxes'], [[0.2, 0.1, 0.6, 0.5]])  # yxyx -> xyxy
  assert record['caption'][0].startswith('caption ') and len(record['caption']) == 2
  assert repr(source) == repr(sources.TfdsSource('tiny_captions', 'train', tiny_tfds_dir))
  config = _tfds_config('image_text', name='tiny_captions', data_dir=tiny_tfds_dir)
  iterator = data_testing.train_pipeline(config, process_index=0, process_count=1)
  batch = next(iterator)
  iterator.close()
  assert batch['image'].shape == (4, 28, 28, 3) and batch['tokens'].shape == (4, 77)
  assert np.all(batch['tokens'][:, 0] == 49406) and np.all(batch['skipped'] == 0)


def test_tfds_missing_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError, match='array_record') as error:
    sources.TfdsSource('imagenet2012', 'train', str(tmp_path))
  assert 'tfds build imagenet2012' in str(error.value)
