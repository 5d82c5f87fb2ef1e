"""Per-process grain input pipelines, checkpointable, handing global jax.Arrays to the step.

API for the training loop::

  layout = sharded.batch_layout(global_batch)           # parallel/batch.py
  it = build_train_pipeline(config, shard_index=layout.shard_index,
                            num_shards=layout.num_shards, seed=config.seed, mesh=mesh)
  batch = next(it)       # dict of global jax.Arrays sharded over the mesh batch axes
                         # (per-process numpy arrays when mesh is None)
  state = it.get_state() # small JSON dict; Orbax: grain.checkpoint.CheckpointSave(it) /
  it.set_state(state)    #   CheckpointRestore(it). Resumes with exactly the batches an
  it.close()             #   uninterrupted run would see, for any number of workers.

  ev = build_eval_pipeline(config, split='val', shard_index=..., num_shards=...,
                           mode='center' | 'native', mesh=None)
  for batch in ev: ...   # the same number of full batches on every process; padding and
                         # undecodable images have valid == 0. 'native' yields one image
                         # at a time at native resolution (LOST), never on a mesh.

  to_global_batch(numpy_batch, mesh, batch_axes=('data', 'fsdp'))

``shard_index``/``num_shards`` say which copy of the data this process reads:
processes that hold the same batch rows (a ``tensor`` axis across hosts) share
an index, so they load the same examples with the same augmentation seeds.
They come from the batch layout (``BatchLayout.shard_index`` / ``num_shards``);
with a ``mesh`` they default to its layout for ``data.batch_axes``, else to
``jax.process_index()``/``jax.process_count()``. ``process_index`` /
``process_count`` are their older names, still accepted.

Train batches (per process: B = data.batch_size // num_shards):
  dinov2: global_crops f32 [B, 2, G, G, 3], local_crops f32 [B, N, L, L, 3] (if N > 0),
          masks bool [B, 2, G/p, G/p] (iBOT), label/index/skipped int32 [B]
  clip:   image f32 [B, S, S, 3], tokens int32 [B, context_length], label/index/skipped
``skipped`` counts undecodable files replaced to make each example; sum it for metrics.

Config keys (``config.trainer`` = 'dinov2' | 'clip' selects the train pipeline; ``config.seed``):
  data.*     source, name, split, eval_split, data_dir, tfds_image_decoding, path, embedded
             (see sources.py); batch_size (global), eval_batch_size (global, default
             batch_size), shuffle, num_epochs (None = forever), num_workers (grain worker
             processes, 0 = in-process), worker_buffer_size (batches per worker),
             read_threads (threads per worker), device_prefetch (batches), batch_axes
  augment.*  dinov2: global_crops_size, local_crops_size, local_crops_number,
             global_crops_scale, local_crops_scale, blur_probs ('as_trained' | 'intended' |
             a (global 1, global 2, local) tuple),
             flip_prob, color_jitter_prob, color_jitter, grayscale_prob, solarize_prob;
             clip: image_size, crop_scale; both: mean, std (default ImageNet for dinov2,
             OpenAI CLIP for clip); eval: eval_resize_size, eval_crop_size, native_max_size
  masking.*  patch_size, mask_probability, ratio_min_max, min_num_patches,
             max_ratio_per_block, min_aspect
  text.*     context_length, bpe_path (CLIP)
"""

import collections
import math

from absl import flags
import grain
import jax
import ml_collections
import numpy as np

from vitreg_jax.data import decode
from vitreg_jax.data import masking
from vitreg_jax.data import sources
from vitreg_jax.data import tokenizer as tokenizer_lib
from vitreg_jax.data import transforms
from vitreg_jax.parallel import batch as batch_lib

TRAINERS = ('dinov2', 'clip')
DATA_DEFAULTS = {
    'source': 'embedded', 'name': '', 'split': 'train', 'eval_split': 'val', 'data_dir': None,
    'tfds_image_decoding': 'ours', 'path': '', 'embedded': {},
    'batch_size': 64, 'eval_batch_size': None, 'shuffle': True, 'num_epochs': None,
    'num_workers': 0, 'worker_buffer_size': 2, 'read_threads': 1, 'device_prefetch': 2,
    'batch_axes': ('data', 'fsdp'),
}
AUGMENT_DEFAULTS = {
    'global_crops_size': 224, 'local_crops_size': 96, 'local_crops_number': 8,
    'global_crops_scale': (0.32, 1.0), 'local_crops_scale': (0.05, 0.32), 'blur_probs': 'as_trained',
    'flip_prob': 0.5, 'color_jitter_prob': 0.8, 'color_jitter': (0.4, 0.4, 0.2, 0.1),
    'grayscale_prob': 0.2, 'solarize_prob': 0.2,
    'image_size': 224, 'crop_scale': (0.9, 1.0),
    'mean': None, 'std': None,
    'eval_resize_size': None, 'eval_crop_size': None, 'native_max_size': None,
}
MASKING_DEFAULTS = {
    'patch_size': 14, 'mask_probability': 0.5, 'ratio_min_max': (0.1, 0.5), 'min_num_patches': 4,
    'max_ratio_per_block': 0.5, 'min_aspect': 0.3,
}
TEXT_DEFAULTS = {'context_length': tokenizer_lib.CONTEXT_LENGTH, 'bpe_path': None}


def _section(config, name, defaults):
  """``config.<name>`` merged over ``defaults``; unknown keys fail loudly."""
  given = config.get(name) if name in config else None
  given = dict(given.to_dict() if hasattr(given, 'to_dict') else (given or {}))
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f'unknown config key(s) config.{name}.{unknown}; valid: {sorted(defaults)}')
  return ml_collections.ConfigDict({**defaults, **given})


def _trainer(config):
  trainer = config.get('trainer', 'dinov2')
  if trainer not in TRAINERS:
    raise ValueError(f'config.trainer must be one of {TRAINERS} for the input pipeline, got {trainer!r}')
  return trainer


def _stream_seed(seed, shard_index, stream):
  """Independent 32-bit seeds per (seed, data shard, stream).

  Shards never share randomness; processes that read the same shard (replicas
  across a ``tensor`` axis) draw the same crops and masks, as they must.
  """
  return int(np.random.SeedSequence([int(seed), int(shard_index), stream]).generate_state(1)[0])


def _data_shard(shard_index, num_shards, process_index, process_count, mesh, data):
  """(shard_index, num_shards): as given (or under the old names), from the mesh, or per process."""
  if process_index is not None or process_count is not None:
    if shard_index is not None or num_shards is not None:
      raise ValueError('give shard_index/num_shards or their old names process_index/'
                       'process_count, not both')
    shard_index, num_shards = process_index, process_count
  if (shard_index is None) != (num_shards is None):
    raise ValueError(f'shard_index and num_shards go together, got {shard_index} and '
                     f'{num_shards}')
  if shard_index is not None:
    if not 0 <= shard_index < num_shards:
      raise ValueError(f'shard_index {shard_index} is outside [0, num_shards={num_shards})')
    return shard_index, num_shards
  if mesh is not None:  # the shard pattern does not depend on the batch size: probe with
    sharding = batch_sharding(mesh, data.batch_axes)  # one row per device
    layout = batch_lib.layout_from_sharding(sharding, sharding.num_devices)
    return layout.shard_index, layout.num_shards
  return jax.process_index(), jax.process_count()


def _per_process(global_batch, num_shards, what):
  if global_batch % num_shards:
    raise ValueError(f'data.{what} ({global_batch}) must be divisible by the number of '
                     f'data shards ({num_shards})')
  return global_batch // num_shards


def _ensure_absl_flags_parsed():
  """grain reads absl flags; scripts that never ran ``app.run`` have not parsed them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def batch_sharding(mesh, batch_axes=('data', 'fsdp')):
  """Leading-axis sharding over those of ``batch_axes`` the mesh has (replicated elsewhere)."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(f'mesh axes {mesh.axis_names} contain none of the batch axes {tuple(batch_axes)}')
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))


def to_global_batch(batch, mesh, batch_axes=('data', 'fsdp')):
  """Per-process numpy batch -> global jax.Arrays (each process holds its rows)."""
  sharding = batch_sharding(mesh, batch_axes)
  return jax.make_array_from_process_local_data(
      jax.tree.map(lambda _: sharding, batch), batch)


def _read_options(data):
  return grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=max(1, data.read_threads))


def _iterate(batched: grain.MapDataset, data):
  """A grain iterator over ``batched``: in-process, or sharded over worker processes."""
  ds = batched.to_iter_dataset(_read_options(data))
  if data.num_workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data.num_workers, per_worker_buffer_size=data.worker_buffer_size))
  return iter(ds)


class TrainIterator(grain.DatasetIterator):
  """Endless batches with a resumable position; optionally prefetched onto a mesh.

  Every batch is an element of one indexable grain dataset (batch ``i`` is a
  pure function of the seed and ``i``), so the state is just the number of
  batches handed out plus a description of the stream; restoring restarts the
  workers at that batch. The state is independent of the worker count and of
  the device prefetch depth.
  """

  def __init__(self, batched: grain.MapDataset, *, description: str, data, mesh=None):
    super().__init__()
    self._batched = batched
    self._description = description
    self._data = data
    self._mesh = mesh
    self._next_batch = 0
    self._grain_iter = None
    self._ready = collections.deque()  # batches fetched (and put on devices) but not yet returned

  @property
  def description(self):
    return self._description

  def start_prefetch(self):
    if self._grain_iter is None:
      self._grain_iter = _iterate(self._batched[self._next_batch + len(self._ready):], self._data)

  def _fetch(self):
    batch = next(self._grain_iter)
    if self._mesh is not None:
      batch = to_global_batch(batch, self._mesh, self._data.batch_axes)  # async host->device copy
    self._ready.append(batch)

  def __next__(self):
    self._assert_not_closed()
    self.start_prefetch()
    depth = max(1, self._data.device_prefetch if self._mesh is not None else 1)
    try:
      while len(self._ready) < depth:
        self._fetch()
    except StopIteration:
      if not self._ready:
        raise
    self._next_batch += 1
    return self._ready.popleft()

  def get_state(self):
    return {'next_batch': self._next_batch, 'pipeline': self._description}

  def set_state(self, state):
    if state.get('pipeline') != self._description:
      raise ValueError('the saved input-pipeline state belongs to a different data stream:\n'
                       f'  saved:   {state.get("pipeline")}\n  current: {self._description}\n'
                       'resume with the same data source, seed, batch size and process layout')
    self._stop()
    self._next_batch = int(state['next_batch'])

  def _stop(self):
    if self._grain_iter is not None:
      self._grain_iter.close()
    self._grain_iter = None
    self._ready.clear()

  def close(self):
    if not self._closed:
      self._stop()
    super().close()

  def __str__(self):
    return f'TrainIterator({self._description})'


def _dinov2_batches(examples, config, per_process_batch, seeds):
  aug = _section(config, 'augment', AUGMENT_DEFAULTS)
  mask = _section(config, 'masking', MASKING_DEFAULTS)
  multicrop = transforms.DinoMultiCrop(
      global_crops_size=aug.global_crops_size, local_crops_size=aug.local_crops_size,
      local_crops_number=aug.local_crops_number, global_crops_scale=aug.global_crops_scale,
      local_crops_scale=aug.local_crops_scale, blur_probs=aug.blur_probs, flip_prob=aug.flip_prob,
      color_jitter_prob=aug.color_jitter_prob, color_jitter=aug.color_jitter,
      grayscale_prob=aug.grayscale_prob, solarize_prob=aug.solarize_prob,
      mean=aug.mean or transforms.IMAGENET_MEAN, std=aug.std or transforms.IMAGENET_STD)
  masks = masking.IbotMasks(
      crop_size=aug.global_crops_size, patch_size=mask.patch_size,
      mask_probability=mask.mask_probability, ratio_min_max=mask.ratio_min_max,
      min_num_patches=mask.min_num_patches, max_ratio_per_block=mask.max_ratio_per_block,
      min_aspect=mask.min_aspect, group_size=config.get('group_size'))
  ds = examples.batch(per_process_batch, drop_remainder=True, batch_fn=list)
  ds = ds.random_map(transforms.BatchedMultiCrop(multicrop), seed=seeds('augment'))
  return ds.random_map(masks, seed=seeds('masks'))


def _clip_batches(examples, config, per_process_batch, seeds):
  aug = _section(config, 'augment', AUGMENT_DEFAULTS)
  text = _section(config, 'text', TEXT_DEFAULTS)
  clip = transforms.ClipTrain(
      image_size=aug.image_size, crop_scale=aug.crop_scale,
      mean=aug.mean or transforms.CLIP_MEAN, std=aug.std or transforms.CLIP_STD,
      tokenizer=tokenizer_lib.ClipTokenizer(text.bpe_path, text.context_length))
  ds = examples.random_map(clip, seed=seeds('augment'))
  return ds.batch(per_process_batch, drop_remainder=True)


def build_train_pipeline(config, *, shard_index=None, num_shards=None, seed=None, mesh=None,
                         process_index=None, process_count=None) -> TrainIterator:
  """The training iterator ``config.trainer`` needs (see the module docstring)."""
  trainer = _trainer(config)
  data = _section(config, 'data', DATA_DEFAULTS)
  shard_index, num_shards = _data_shard(shard_index, num_shards, process_index, process_count,
                                        mesh, data)
  seed = config.get('seed', 0) if seed is None else seed
  per_process_batch = _per_process(data.batch_size, num_shards, 'batch_size')
  source = sources.make_source(data, data.split)

  examples = grain.MapDataset.source(source)[shard_index::num_shards]
  if len(examples) < per_process_batch:
    raise ValueError(f'data shard {shard_index} has {len(examples)} examples of {source!r}, '
                     f'fewer than one per-process batch ({per_process_batch})')
  seeds = lambda stream: _stream_seed(seed, shard_index, ['shuffle', 'augment', 'masks'].index(stream))
  if data.shuffle:
    examples = examples.shuffle(seed=seeds('shuffle'))
  examples = examples.repeat(data.num_epochs)
  examples = decode.DecodedDataset(examples, on_error='substitute')
  build = _dinov2_batches if trainer == 'dinov2' else _clip_batches
  batched = build(examples, config, per_process_batch, seeds)
  description = (f'{trainer} {source!r} process {shard_index}/{num_shards} '
                 f'batch {per_process_batch} seed {seed} shuffle {data.shuffle} '
                 f'epochs {data.num_epochs}')
  return TrainIterator(batched, description=description, data=data, mesh=mesh)


class EvalPipeline:
  """Re-iterable evaluation batches (fresh workers per pass); see the module docstring."""

  def __init__(self, batched, *, data, mesh, num_batches, num_examples):
    self._batched, self._data, self._mesh = batched, data, mesh
    self.num_batches, self.num_examples = num_batches, num_examples

  def __len__(self):
    return self.num_batches

  def __iter__(self):
    iterator = _iterate(self._batched, self._data)
    try:
      for batch in iterator:
        yield batch if self._mesh is None else to_global_batch(batch, self._mesh, self._data.batch_axes)
    finally:
      iterator.close()


def build_eval_pipeline(config, *, split=None, shard_index=None, num_shards=None,
                        mode='center', mesh=None, process_index=None,
                        process_count=None) -> EvalPipeline:
  """Evaluation batches: ``'center'`` resize + centre crop, or ``'native'`` (LOST) one by one."""
  if mode not in ('center', 'native'):
    raise ValueError(f"eval mode must be 'center' or 'native', got {mode!r}")
  trainer = _trainer(config)
  data = _section(config, 'data', DATA_DEFAULTS)
  aug = _section(config, 'augment', AUGMENT_DEFAULTS)
  shard_index, num_shards = _data_shard(shard_index, num_shards, process_index, process_count,
                                        mesh if mode == 'center' else None, data)
  source = sources.make_source(data, split or data.eval_split)
  mean = aug.mean or (transforms.IMAGENET_MEAN if trainer == 'dinov2' else transforms.CLIP_MEAN)
  std = aug.std or (transforms.IMAGENET_STD if trainer == 'dinov2' else transforms.CLIP_STD)
  if mode == 'native':
    per_process_batch = 1
    transform = transforms.EvalNative(patch_size=_section(config, 'masking', MASKING_DEFAULTS).patch_size,
                                      mean=mean, std=std, max_size=aug.native_max_size)
    mesh = None
  else:
    per_process_batch = _per_process(data.eval_batch_size or data.batch_size, num_shards,
                                     'eval_batch_size')
    default_crop = 224 if trainer == 'dinov2' else aug.image_size
    crop = aug.eval_crop_size or default_crop
    resize = aug.eval_resize_size or (round(crop * 256 / 224) if trainer == 'dinov2' else crop)
    transform = transforms.EvalCenterCrop(resize_size=resize, crop_size=crop, mean=mean, std=std)
  num_batches = math.ceil(len(source) / (num_shards * per_process_batch))
  padded = sources.PaddedSource(source, num_batches * per_process_batch * num_shards)
  ds = grain.MapDataset.source(padded)[shard_index::num_shards]
  ds = decode.DecodedDataset(ds, on_error='invalid').map(transform)
  ds = ds.batch(per_process_batch, drop_remainder=True)
  return EvalPipeline(ds, data=data, mesh=mesh, num_batches=num_batches, num_examples=len(source))
