"""Random-access data sources: tfds (ArrayRecord), image folders, caption lists, embedded.

A source is what grain's ``MapDataset.source`` needs (``__len__``,
``__getitem__``) plus a deterministic ``repr`` that names its content, so a
restored pipeline can check it reads the same data. Every source returns records
in one convention, so the transforms never know where data came from:

  image       encoded bytes, a file path, or a uint8 array (decoded later by
              :mod:`vitreg_jax.data.decode`, where failures are caught and counted)
  label       int class id, -1 when the source has none
  boxes       float32 [n, 4] (x0, y0, x1, y1) normalised to [0, 1]; [0, 4] if none
  box_crowd   bool [n], where the dataset marks crowd boxes (tfds coco)
  filename    str, where the dataset has one (tfds ``image/filename``)
  caption     str, or a list of str (one is picked per sample); '' if none
  index       int position in the source

Config keys (``config.data``): ``source`` ('embedded' | 'tfds' | 'folder' |
'captions'), ``name`` (tfds name, e.g. 'imagenet2012', 'voc/2007', 'coco/2014',
'coco_captions'), ``data_dir`` (tfds data dir; default $TFDS_DATA_DIR or
~/tensorflow_datasets), ``tfds_image_decoding`` ('ours' reads the encoded bytes and
decodes them robustly; 'tfds' lets tfds decode, needed under
``tfds.testing.mock_data`` without TensorFlow), ``path`` (folder root, or a
JSONL/CSV caption list; '{split}' in it is replaced by the split), and
``embedded`` (a dict of :class:`vitreg_jax.data.embedded.EmbeddedConfig` fields).
"""

import csv
import json
import os

import numpy as np

from vitreg_jax.data import embedded

SOURCE_KINDS = ('embedded', 'tfds', 'folder', 'captions')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
_NO_BOXES = np.zeros((0, 4), np.float32)


class EmbeddedSource:
  """The procedurally generated shapes dataset (see :mod:`vitreg_jax.data.embedded`)."""

  def __init__(self, split: str = 'train', **config):
    self.split = split
    self.config = embedded.EmbeddedConfig(**config)
    if split not in embedded.SPLITS:
      raise ValueError(f'embedded split must be one of {embedded.SPLITS}, got {split!r}')

  def __len__(self):
    return self.config.num_train if self.split == 'train' else self.config.num_val

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for {self!r}')
    record = embedded.render(self.config, self.split, index)
    record['index'] = index
    return record

  @property
  def num_classes(self):
    return self.config.num_classes

  def __repr__(self):
    fields = ', '.join(f'{k}={v}' for k, v in sorted(vars(self.config).items()))
    return f'EmbeddedSource(split={self.split!r}, {fields})'


class ImageFolderSource:
  """``root/<class>/<image>`` files; classes are the sorted sub-folder names."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f'image folder {self.root!r} does not exist')
    self.classes = sorted(d for d in os.listdir(self.root)
                          if os.path.isdir(os.path.join(self.root, d)))
    if not self.classes:
      raise ValueError(f'image folder {self.root!r} has no class sub-folders '
                       '(expected root/<class_name>/<image files>)')
    self.files, self.labels = [], []
    for label, name in enumerate(self.classes):
      for dirpath, _, filenames in sorted(os.walk(os.path.join(self.root, name))):
        for filename in sorted(filenames):
          if filename.lower().endswith(IMAGE_EXTENSIONS):
            self.files.append(os.path.relpath(os.path.join(dirpath, filename), self.root))
            self.labels.append(label)
    if not self.files:
      raise ValueError(f'image folder {self.root!r} has class folders but no images with '
                       f'extensions {IMAGE_EXTENSIONS}')

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index):
    index = int(index)
    return {'image': os.path.join(self.root, self.files[index]), 'label': self.labels[index],
            'boxes': _NO_BOXES, 'caption': '', 'index': index}

  @property
  def num_classes(self):
    return len(self.classes)

  def __repr__(self):
    return (f'ImageFolderSource(root={self.root!r}, num_classes={len(self.classes)}, '
            f'num_images={len(self.files)})')


class CaptionListSource:
  """Image-caption pairs listed in a JSONL or CSV/TSV file (fields ``path``, ``caption``).

  Relative paths are resolved against the list file's folder. A caption field
  holding a JSON list gives several captions per image (one is sampled).
  """

  def __init__(self, path: str, path_key: str = 'path', caption_key: str = 'caption'):
    self.path = os.path.abspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f'caption list {self.path!r} does not exist')
    base = os.path.dirname(self.path)
    rows = []
    if self.path.endswith(('.jsonl', '.json')):
      with open(self.path, encoding='utf-8') as f:
        for line_number, line in enumerate(f, 1):
          if line.strip():
            try:
              rows.append(json.loads(line))
            except json.JSONDecodeError as e:
              raise ValueError(f'{self.path}:{line_number}: not valid JSON ({e})') from None
    elif self.path.endswith(('.csv', '.tsv')):
      with open(self.path, encoding='utf-8', newline='') as f:
        rows = list(csv.DictReader(f, delimiter='\t' if self.path.endswith('.tsv') else ','))
    else:
      raise ValueError(f'caption list {self.path!r} must end in .jsonl, .json, .csv or .tsv')
    self.images, self.captions = [], []
    for number, row in enumerate(rows, 1):
      if path_key not in row or caption_key not in row:
        raise ValueError(f'{self.path}: row {number} lacks {path_key!r} or {caption_key!r} '
                         f'(has {sorted(row)})')
      self.images.append(os.path.join(base, row[path_key]))
      self.captions.append(row[caption_key])
    if not self.images:
      raise ValueError(f'caption list {self.path!r} is empty')

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    index = int(index)
    return {'image': self.images[index], 'label': -1, 'boxes': _NO_BOXES,
            'caption': self.captions[index], 'index': index}

  def __repr__(self):
    return f'CaptionListSource(path={self.path!r}, num_pairs={len(self.images)})'


def _prepare_hint(name, data_dir):
  where = data_dir or '~/tensorflow_datasets'
  return (f'Prepare it once as ArrayRecord (building needs TensorFlow in that environment):\n'
          f'  tfds build {name} --data_dir={where} --file_format=array_record\n'
          f'(imagenet2012 also needs the manual download in {where}/downloads/manual), '
          f'or convert an existing TFRecord copy:\n'
          f'  tfds convert_format --dataset_dir={where}/{name} --out_file_format=array_record')


def _latest_version_dir(data_dir, name):
  """``data_dir/name/<latest version>`` if a prepared dataset is there, else None."""
  root = os.path.join(os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')),
                      name)
  if not os.path.isdir(root):
    return None
  versions = [v for v in os.listdir(root)
              if os.path.isfile(os.path.join(root, v, 'dataset_info.json'))]
  if not versions:
    return None
  latest = max(versions, key=lambda v: tuple(int(x) for x in v.split('.') if x.isdigit()))
  return os.path.join(root, latest)


def _get(example, key):
  """``example['a/b']`` looks through nested dicts; tfds also uses '/' inside flat keys."""
  if key in example:
    return example[key]
  head, _, rest = key.partition('/')
  if rest and isinstance(example.get(head), dict):
    return _get(example[head], rest)
  raise KeyError(key)


class TfdsSource:
  """A tfds dataset read through ``tfds.data_source`` (ArrayRecord, no TensorFlow)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None, image_decoding: str = 'ours'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if image_decoding not in ('ours', 'tfds'):
      raise ValueError(f"data.tfds_image_decoding must be 'ours' or 'tfds', got {image_decoding!r}")
    self.name, self.split, self.data_dir, self.image_decoding = name, split, data_dir, image_decoding
    decoders = {'image': tfds.decode.SkipDecoding()} if image_decoding == 'ours' else None
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                      decoders=decoders)
    except ModuleNotFoundError as e:
      # Some builders (coco) need TensorFlow just to describe their features;
      # a prepared copy can still be read from its own dataset_info.json.
      version_dir = _latest_version_dir(data_dir, name)
      if 'tensorflow' not in str(e) or version_dir is None:
        raise ValueError(f'tfds dataset {name!r} could not be opened without TensorFlow and no '
                         f'prepared copy was found under data_dir={data_dir!r}. '
                         + _prepare_hint(name, data_dir)) from e
      self._source = tfds.builder_from_directory(version_dir).as_data_source(split, decoders=decoders)
    except Exception as e:  # tfds raises several types for "not there / wrong format"
      raise ValueError(f'tfds dataset {name!r} split {split!r} is not available as ArrayRecord in '
                       f'data_dir={data_dir!r} ({type(e).__name__}: '
                       f'{str(e).splitlines()[0].replace(" Possible root causes:", "")}). '
                       + _prepare_hint(name, data_dir)) from e
    features = self._source.dataset_info.features
    self._has_label = 'label' in features
    self._box_key = 'objects/bbox' if 'objects' in features and 'bbox' in features['objects'] else None
    self._crowd_key = 'objects/is_crowd' if self._box_key and 'is_crowd' in features['objects'] else None
    self._filename_key = 'image/filename' if 'image/filename' in features else None
    self._caption_key = 'captions/text' if 'captions' in features else (
        'caption' if 'caption' in features else None)
    self.num_classes = features['label'].num_classes if self._has_label else 0

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    index = int(index)
    example = self._source[index]
    record = {'image': example['image'], 'index': index,
              'label': int(example['label']) if self._has_label else -1,
              'boxes': _NO_BOXES, 'caption': ''}
    if self._box_key:
      yxyx = np.asarray(_get(example, self._box_key), np.float32).reshape(-1, 4)
      record['boxes'] = yxyx[:, [1, 0, 3, 2]]
    if self._crowd_key:
      record['box_crowd'] = np.asarray(_get(example, self._crowd_key), bool).reshape(-1)
    if self._filename_key:
      name = _get(example, self._filename_key)
      record['filename'] = name.decode('utf-8') if isinstance(name, bytes) else str(name)
    if self._caption_key:
      captions = _get(example, self._caption_key)
      captions = [captions] if isinstance(captions, (str, bytes)) else list(captions)
      record['caption'] = [c.decode('utf-8') if isinstance(c, bytes) else str(c) for c in captions]
    return record

  def __repr__(self):
    return (f'TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, '
            f'image_decoding={self.image_decoding!r}, size={len(self)})')


class PaddedSource:
  """``source`` extended to ``length`` records with blank, ``valid = 0`` padding.

  Evaluation pads the dataset so every process gets the same number of full
  batches (global arrays need the same shape everywhere); metrics drop padding.
  """

  def __init__(self, source, length: int):
    if length < len(source):
      raise ValueError(f'padded length {length} is shorter than the source ({len(source)})')
    self.source, self.length = source, int(length)

  def __len__(self):
    return self.length

  def __getitem__(self, index):
    index = int(index)
    if index < len(self.source):
      return self.source[index]
    return {'image': np.zeros((16, 16, 3), np.uint8), 'label': -1, 'boxes': _NO_BOXES,
            'caption': '', 'index': -1, 'valid': 0}

  def __repr__(self):
    return f'PaddedSource({self.source!r}, length={self.length})'


def make_source(data_config, split: str):
  """The source ``config.data`` describes, for ``split`` ('train', 'val', tfds split strings)."""
  kind = data_config.get('source', 'embedded')
  if kind == 'embedded':
    options = data_config.get('embedded') or {}
    return EmbeddedSource(split, **(options.to_dict() if hasattr(options, 'to_dict') else dict(options)))
  if kind == 'tfds':
    if not data_config.get('name'):
      raise ValueError("data.source='tfds' needs data.name (e.g. 'imagenet2012', 'voc/2007')")
    return TfdsSource(data_config.name, split, data_config.get('data_dir'),
                      data_config.get('tfds_image_decoding', 'ours'))
  if kind in ('folder', 'captions'):
    if not data_config.get('path'):
      raise ValueError(f"data.source={kind!r} needs data.path")
    path = data_config.path.replace('{split}', split)
    if kind == 'folder':
      # ImageNet-style layouts keep one folder per split under the root.
      split_root = os.path.join(path, split)
      return ImageFolderSource(split_root if os.path.isdir(split_root) else path)
    return CaptionListSource(path)
  raise ValueError(f'unknown data.source {kind!r}; valid: {SOURCE_KINDS}')
