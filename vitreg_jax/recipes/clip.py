"""CLIP (+registers): contrastive image-text training, the paper's second model (REFERENCE §4).

One step: the image tower (our ViT with registers; cls or mean-of-patches
pooling, registers never pooled) and the causal text tower embed the batch's
images and captions; the loss scores every image against every text of the
*global* batch (``losses/contrastive.py``: softmax CLIP or sigmoid SigLIP,
``plain`` or the linear-memory ``chunked`` ring; exact global gradients).
AdamW through the optimizer table, no weight decay on gains, biases, token
and position embeddings and the logit scale/bias; then the log logit scale is
clamped to [0, ln 100] (the bias never is).

LiT (``clip.lit = 'FORMAT:PATH'``): the image tower starts from a pretrained
backbone loaded through the converter and stays locked (lr 0, no gradient
computed through it); the image projection and the text tower train.

The image tower is timm's ViT with registers (OpenCLIP's timm-tower route,
REFERENCE §9: patch bias, LayerNorm eps 1e-6, no LayerScale), so it exports
to vitreg / timm / HF like the other backbones. Evaluation: zero-shot top-1
(``evals/zeroshot.py``).

Config keys: ``model.*`` (image tower), ``text.*`` (text tower, tokenizer),
``clip.*`` (embed_dim, pool, loss, loss_impl, logit scale/bias inits, lit),
``augment.*``, ``zeroshot.*`` (``configs/clip_reg.py``).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitreg_jax import config as config_lib
from vitreg_jax.data import tokenizer as tokenizer_lib
from vitreg_jax.data.image_text import AUGMENT_DEFAULTS, ImageTextBatches
from vitreg_jax.data.pipeline import section
from vitreg_jax.evals import zeroshot
from vitreg_jax.losses import contrastive
from vitreg_jax.models.build import backbone_from_config, dtype_from_name
from vitreg_jax.models.clip import CLIP
from vitreg_jax.models.text import TextTransformer
from vitreg_jax.parallel import rules as rules_lib
from vitreg_jax.train import flops, optim
from vitreg_jax.train.optim import ParamGroup
from vitreg_jax.train.recipe import BatchField, Export
from vitreg_jax.train.state import TrainState, unbox

SECTIONS = ('model', 'text', 'clip', 'augment', 'zeroshot')
TEXT = {'width': 512, 'depth': 12, 'num_heads': 8, 'mlp_ratio': 4.0, 'vocab_size': 49408,
        'context_length': tokenizer_lib.CONTEXT_LENGTH, 'act': 'gelu', 'bpe_path': None}
CLIP_KEYS = {'embed_dim': 512, 'pool': 'cls', 'loss': 'clip', 'loss_impl': 'plain',
             'init_logit_scale': math.log(1 / 0.07), 'init_logit_bias': None,
             'max_logit_scale': math.log(100.0), 'lit': ''}
ZEROSHOT = {'classnames': 'imagenet', 'templates': 'openai'}
LOSS_KINDS = {'clip': 'softmax', 'siglip': 'sigmoid'}


def clip_groups(lit: bool = False) -> tuple[ParamGroup, ...]:
  """OpenCLIP's table on our names: no decay on 1-d params (biases, LayerNorm gains, the
  logit scale and bias) and on embeddings of tokens and positions; LiT locks ``visual``."""
  rows = (
      ParamGroup(r'(^|/)(bias|scale|gamma|logit_scale|logit_bias)$', wd_mult=0.0),
      ParamGroup(r'(^|/)(pos_embed|positional_embedding|cls_token|register_tokens|mask_token)$',
                 wd_mult=0.0),
  )
  return rows + ((ParamGroup(r'^visual/', lr_mult=0.0),) if lit else ())


class CLIPRecipe:
  """See ``vitreg_jax/train/recipe.py`` for the interface."""
  zero_metrics = ()
  progress_keys = ('logit_scale', 'lr', 'grad_norm')
  best_metric = ('zeroshot_top1', 'max')
  nonfinite_hint = ('lower optim.base_lr, raise optim.warmup_epochs, or use '
                    'model.dtype=float32')

  def __init__(self, config):
    config_lib.validate_shared(config, SECTIONS)
    self.config = config
    text = section(config, 'text', TEXT)
    head = section(config, 'clip', CLIP_KEYS)
    self.augment = section(config, 'augment', AUGMENT_DEFAULTS)
    self.zeroshot = section(config, 'zeroshot', ZEROSHOT)
    config_lib.check_choice(head.loss, tuple(LOSS_KINDS), 'clip.loss')
    config_lib.check_choice(head.loss_impl, contrastive.IMPLS, 'clip.loss_impl')
    config_lib.check_choice(head.pool, ('cls', 'mean'), 'clip.pool')
    self.loss_kind, self.loss_impl = LOSS_KINDS[head.loss], head.loss_impl
    self.max_logit_scale = float(head.max_logit_scale)
    self.lit = str(head.lit or '')
    self.image_size = int(self.augment.image_size)
    self.visual = backbone_from_config(config.model, img_size=self.image_size)
    if self.image_size % self.visual.patch_size:
      raise config_lib.ConfigError(
          f'augment.image_size={self.image_size} is not a multiple of the patch size '
          f'{self.visual.patch_size}')
    model_dtype = dtype_from_name(config.model.get('dtype', 'float32'))
    self.text = TextTransformer(
        vocab_size=int(text.vocab_size), context_length=int(text.context_length),
        width=int(text.width), depth=int(text.depth), num_heads=int(text.num_heads),
        mlp_ratio=float(text.mlp_ratio), embed_dim=int(head.embed_dim), act=text.act,
        dtype=model_dtype, scan_blocks=bool(config.model.get('scan_blocks', False)),
        remat_policy=config.model.get('remat_policy', 'none'),
        attention_impl=config.model.get('attention_impl', 'auto'))
    self.model = CLIP(self.visual, self.text, embed_dim=int(head.embed_dim), pool=head.pool,
                      init_logit_scale=float(head.init_logit_scale),
                      init_logit_bias=head.init_logit_bias)
    self.tokenizer = tokenizer_lib.ClipTokenizer(text.bpe_path, int(text.context_length))
    self.host_batches = ImageTextBatches(self.augment, int(text.context_length), text.bpe_path)
    self.global_batch_size = int(config.data.batch_size)
    self.batch_mesh_axes = tuple(config.data.batch_axes)
    s, length = self.image_size, int(text.context_length)
    self.batch_spec = {
        'image': BatchField((s, s, 3), jnp.float32, ('batch', None, None, None)),
        'tokens': BatchField((length,), jnp.int32, ('batch', None)),
    }
    o = config.optim
    self.total_steps = int(o.epochs) * int(o.epoch_length)
    self.learning_rate, self.tx = optim.from_config(o, clip_groups(bool(self.lit)),
                                                    self.total_steps)

  # --- state and step --------------------------------------------------------
  @functools.cached_property
  def _lit_params(self):
    """The LiT tower's params as host arrays, read once (init runs abstractly, then for real)."""
    from vitreg_jax import convert  # pylint: disable=import-outside-toplevel
    _, variables = convert.load(self.lit, scan_blocks=self.visual.scan_blocks)
    return jax.tree.map(np.asarray, unbox(variables['params']))

  def _pretrained_visual(self, like):
    """LiT's image tower from ``clip.lit``, read on the host and handed to the traced init
    by a callback (no weights baked into the program)."""
    loaded = self._lit_params
    wanted = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), unbox(like))
    got = dict(jax.tree_util.tree_leaves_with_path(loaded))
    need = dict(jax.tree_util.tree_leaves_with_path(wanted))
    bad = sorted(jax.tree_util.keystr(k) for k in set(got) ^ set(need)) or sorted(
        f'{jax.tree_util.keystr(k)} {got[k].shape} vs {need[k].shape}'
        for k in need if got[k].shape != need[k].shape)
    if bad:
      raise config_lib.ConfigError(f'clip.lit={self.lit!r} does not fit model.*: {bad[:3]}')
    loaded = jax.tree.map(lambda a, w: a.astype(w.dtype), loaded, wanted)
    values = jax.pure_callback(lambda: loaded, wanted)
    return jax.tree.map(lambda box, value: box.replace_boxed(value) if rules_lib.is_boxed(box)
                        else value, like, values, is_leaf=rules_lib.is_boxed)

  def init_state(self, rng: jax.Array) -> TrainState:
    images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, self.text.context_length), jnp.int32)
    params = self.model.init({'params': rng}, images, tokens)['params']
    if self.lit:
      params = {**params, 'visual': self._pretrained_visual(params['visual'])}
    return TrainState.create(params=params, opt_state=self.tx.init(unbox(params)))

  def _loss(self, params, batch, rng):
    if self.lit:  # locked: no backward pass through the image tower at all
      params = {**params, 'visual': jax.lax.stop_gradient(params['visual'])}
    out = self.model.apply({'params': params}, batch['image'], batch['tokens'], train=True,
                           rngs={'dropout': rng})
    loss = contrastive.contrastive_loss(
        self.loss_kind, out['image_embeds'], out['text_embeds'], out['logit_scale'],
        out['logit_bias'], impl=self.loss_impl, batch_axes=self.batch_mesh_axes)
    return loss, out['logit_scale']

  def train_step(self, state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (loss, log_scale), grads = jax.value_and_grad(self._loss, has_aux=True)(
        state.params, batch, rng)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # OpenCLIP clamps the log scale in place after every step; the bias is never clamped.
    params = {**params, 'logit_scale': jnp.clip(params['logit_scale'], 0.0,
                                                self.max_logit_scale)}
    metrics = {'loss': loss, 'logit_scale': jnp.exp(log_scale),
               'grad_norm': optax.tree.norm(grads), 'lr': self.learning_rate(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  # --- evaluation and export -------------------------------------------------
  def two_towers(self, state: TrainState):
    return self.model, {'params': state.params}

  def evaluators(self):
    num_classes = None
    if self.config.data.source == 'embedded':
      num_classes = dict(self.config.data.embedded).get('num_classes')
    evaluator = zeroshot.ZeroShotEvaluator(
        self.config, self.two_towers,
        names=zeroshot.classnames(self.zeroshot.classnames, num_classes),
        prompts=zeroshot.templates(self.zeroshot.templates), tokenizer=self.tokenizer,
        encode_image=CLIP.encode_image, encode_text=CLIP.encode_text,
        every=int(self.config.train.eval_every))
    return [evaluator]

  def exports(self, state: TrainState) -> dict[str, Export]:
    """The image tower as a backbone (the configured formats), and both towers for OpenCLIP.

    ``export/clip_open_clip`` loads with ``convert.load_clip('open_clip:...')`` and in
    ``open_clip.create_model('local-dir:...')`` (``convert.open_clip_torch``).
    """
    return {'backbone': Export(self.visual, {'params': state.params['visual']}),
            'clip': Export(self.model, {'params': state.params}, formats=('open_clip',))}

  def analytic_flops(self, global_batch_size: int) -> float:
    t = self.text
    image = (flops.vit_forward_flops(self.visual, (self.image_size, self.image_size))
             + flops.dense_flops(self.visual.embed_dim, self.model.embed_dim))
    per_token = 2 * (4 * t.width * t.width + 2 * t.width * t.mlp_hidden_dim)
    attention = 4 * t.context_length * t.width
    text = t.depth * t.context_length * (per_token + attention) + 2 * t.width * t.embed_dim
    contrastive_flops = 2 * global_batch_size * self.model.embed_dim  # per image: one row
    per_image = image + text + contrastive_flops
    return flops.TRAIN_FORWARD_MULTIPLIER * per_image * global_batch_size


def make_recipe(config) -> CLIPRecipe:
  return CLIPRecipe(config)
