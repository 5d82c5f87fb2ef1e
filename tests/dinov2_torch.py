"""An independent PyTorch DINOv2 training step, the yardstick for ``vitreg_jax/train/dinov2.py``.

Written from the reference semantics (REFERENCE §1, §3 and facebookresearch/dinov2
``train/ssl_meta_arch.py``, ``train/train.py``, ``loss/*``, ``layers/{block,
dino_head}.py``, ``models/vision_transformer.py``, ``utils/param_groups.py``,
``data/collate.py``), for one process (one "GPU" holding the whole batch), in
float32, without FSDP or xFormers. Nothing here imports the JAX recipe: only
the name/layout converters are shared, to start both sides from the same
weights and to compare them afterwards.

What the reference does and this file keeps:

- student pass: global crops with iBOT masks, local crops without; subset drop
  path on every block branch for any rate > 0 (the nested-list forward the
  student runs in training), per tensor of crops;
- teacher pass in eval mode (no drop path), cls tokens swapped by crop;
- crops and masks in the collate's crop-major order ``[crop * B + b]``;
- centring with the reference's deferred update (the centre a step uses holds
  the batches before it); Sinkhorn-Knopp with 3 iterations, iBOT over the
  masked patches only;
- AdamW param groups per student submodule (layer decay, patch-embed lr
  multiplier, no decay on biases / norms / gammas, last layer frozen), the
  schedules as numpy ``CosineScheduler`` tables indexed by the iteration,
  ``clip_grad_norm_`` per submodule, then the teacher EMA.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitreg_jax.convert import dinov2 as hub
from vitreg_jax.convert import params as flat_params

BACKBONE_LAYER_ZERO = ('cls_token', 'pos_embed', 'register_tokens', 'mask_token', 'patch_embed')


# --------------------------------------------------------------------------
# Schedules (dinov2/utils/utils.py CosineScheduler, train.py build_schedulers)


class CosineTable:
  """Frozen zeros, ``linspace`` warmup, cosine to ``final``; ``final`` past the end."""

  def __init__(self, base, final, total, warmup=0, start=0.0, freeze=0):
    self.final, self.total = final, total
    n = total - warmup - freeze
    i = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / n))
    self.table = np.concatenate([np.zeros(freeze), np.linspace(start, base, warmup), cosine])
    assert len(self.table) == total

  def __getitem__(self, it):
    return self.final if it >= self.total else float(self.table[it])


class Schedules:
  """lr, wd, momentum, teacher temperature and last-layer lr, as the reference builds them."""

  def __init__(self, config):
    o, t = config.optim, config.teacher
    length = o.epoch_length
    lr = o.base_lr
    if o.scaling_rule == 'sqrt_wrt_1024':
      lr = o.base_lr * math.sqrt(config.data.batch_size / 1024.0)
    total = o.epochs * length
    self.lr = CosineTable(lr, o.min_lr, total, warmup=o.warmup_epochs * length)
    self.wd = CosineTable(o.weight_decay, o.weight_decay_end, total)
    self.momentum = CosineTable(t.momentum_teacher, t.final_momentum_teacher, total)
    warm = t.warmup_teacher_temp_epochs * length
    self.teacher_temp = CosineTable(t.teacher_temp, t.teacher_temp, warm, warmup=warm,
                                    start=t.warmup_teacher_temp)
    self.last_layer_lr = CosineTable(lr, o.min_lr, total, warmup=o.warmup_epochs * length)
    self.last_layer_lr.table[:o.freeze_last_layer_epochs * length] = 0

  def at(self, it):
    return {k: getattr(self, k)[it]
            for k in ('lr', 'wd', 'momentum', 'teacher_temp', 'last_layer_lr')}


# --------------------------------------------------------------------------
# Backbone (dinov2/models/vision_transformer.py, layers/block.py)


class Attention(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    attn = torch.softmax((q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):

  def __init__(self, dim, value):
    super().__init__()
    self.gamma = nn.Parameter(torch.full((dim,), float(value)))

  def forward(self, x):
    return x * self.gamma


def add_residual_on_subset(x, branch, rate):
  """The reference's training drop path: the branch on an exact random subset of rows."""
  b = x.shape[0]
  keep = max(int(b * (1 - rate)), 1)
  rows = torch.randperm(b)[:keep]
  residual = branch(x[rows])
  return torch.index_add(x.flatten(1), 0, rows, residual.flatten(1), alpha=b / keep).view_as(x)


class Block(nn.Module):

  def __init__(self, dim, heads, mlp_ratio, layerscale, drop_path):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
    self.drop_path = drop_path

  def forward(self, x):
    attn = lambda y: self.ls1(self.attn(self.norm1(y)))
    ffn = lambda y: self.ls2(self.mlp(self.norm2(y)))
    if self.training and self.drop_path > 0:
      x = add_residual_on_subset(x, attn, self.drop_path)
      return add_residual_on_subset(x, ffn, self.drop_path)
    x = x + attn(x)
    return x + ffn(x)


class PatchEmbed(nn.Module):

  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
  """DINOv2 ViT with registers; parameter names are the hub state-dict names (REFERENCE §2)."""

  def __init__(self, img_size, patch, dim, depth, heads, registers, layerscale, drop_path=0.0,
               mlp_ratio=4.0, antialias=True, offset=0.0):
    super().__init__()
    self.patch, self.registers, self.antialias, self.offset = patch, registers, antialias, offset
    grid = img_size // patch
    self.patch_embed = PatchEmbed(patch, dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
    self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
    self.mask_token = nn.Parameter(torch.zeros(1, dim))
    self.blocks = nn.ModuleList(
        [Block(dim, heads, mlp_ratio, layerscale, drop_path) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def pos_embed_for(self, h, w):
    n = self.pos_embed.shape[1] - 1
    gh, gw = h // self.patch, w // self.patch
    if gh * gw == n and h == w:
      return self.pos_embed
    m = int(math.sqrt(n))
    grid = self.pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if self.offset:
      kw = {'scale_factor': ((gh + self.offset) / m, (gw + self.offset) / m)}
    else:
      kw = {'size': (gh, gw)}
    grid = F.interpolate(grid, mode='bicubic', antialias=self.antialias, **kw)
    patches = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
    return torch.cat([self.pos_embed[:, :1], patches], dim=1)

  def forward(self, x, masks=None):
    """NCHW images, masks ``[B, N]`` bool -> normed cls ``[B, D]`` and patches ``[B, N, D]``."""
    h, w = x.shape[-2:]
    t = self.patch_embed(x)
    if masks is not None:
      t = torch.where(masks.unsqueeze(-1), self.mask_token.unsqueeze(0), t)
    t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
    t = t + self.pos_embed_for(h, w)
    if self.register_tokens is not None:
      t = torch.cat([t[:, :1], self.register_tokens.expand(t.shape[0], -1, -1), t[:, 1:]], dim=1)
    for block in self.blocks:
      t = block(t)
    t = self.norm(t)
    return {'cls': t[:, 0], 'patches': t[:, 1 + self.registers:]}


# --------------------------------------------------------------------------
# Head (dinov2/layers/dino_head.py)


class DINOHead(nn.Module):
  """MLP (GELU), L2 normalise, weight-normed bias-free prototypes (``weight_g``, ``weight_v``)."""

  def __init__(self, in_dim, out_dim, hidden, bottleneck, nlayers=3):
    super().__init__()
    dims = [in_dim] + [hidden] * (nlayers - 1) + [bottleneck]
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
      layers.append(nn.Linear(a, b))
      if i < nlayers - 1:
        layers.append(nn.GELU())
    self.mlp = nn.Sequential(*layers)
    self.last_layer = nn.Module()
    self.last_layer.weight_g = nn.Parameter(torch.ones(out_dim, 1))
    self.last_layer.weight_v = nn.Parameter(torch.zeros(out_dim, bottleneck))

  def forward(self, x):
    x = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12)
    v, g = self.last_layer.weight_v, self.last_layer.weight_g
    return x @ (g * v / v.norm(dim=1, keepdim=True)).t()


# --------------------------------------------------------------------------
# Losses (dinov2/loss/*)


class Centre:
  """The EMA centre with the reference's deferred update (applied at the next use)."""

  def __init__(self, k, momentum=0.9):
    self.value = torch.zeros(1, k)
    self.momentum = momentum
    self.pending = None

  def apply_pending(self):
    if self.pending is not None:
      self.value = self.value * self.momentum + self.pending * (1 - self.momentum)
      self.pending = None
    return self.value

  def softmax(self, logits, temp):
    return F.softmax((logits - self.apply_pending()) / temp, dim=-1)

  def update(self, logits):
    self.pending = logits.sum(0, keepdim=True) / len(logits)


@torch.no_grad()
def sinkhorn_knopp(logits, temp, n_samples, iterations=3):
  q = torch.exp(logits.float() / temp).t()  # [K, samples]
  k = q.shape[0]
  q /= q.sum()
  for _ in range(iterations):
    q /= q.sum(dim=1, keepdim=True)
    q /= k
    q /= q.sum(dim=0, keepdim=True)
    q /= n_samples
  return (q * n_samples).t()


def dino_cross_entropy(student_chunks, teacher_list, student_temp=0.1):
  """``-sum_{s, t} mean_b <t, log_softmax(s / T)>`` over student chunks x teacher crops."""
  total = 0
  for s in student_chunks:
    log_p = F.log_softmax(s / student_temp, dim=-1)
    for t in teacher_list:
      total = total - torch.sum(t * log_p, dim=-1).mean()
  return total


def ibot_masked_loss(student, teacher, masks_weight, n_images, student_temp=0.1):
  per_patch = torch.sum(teacher * F.log_softmax(student / student_temp, dim=-1), dim=-1)
  return -(per_patch * masks_weight).sum() / n_images


def koleo(x, eps=1e-8):
  x = F.normalize(x, eps=eps, p=2, dim=-1)
  dots = x @ x.t()
  dots.fill_diagonal_(-1)
  nn_index = dots.argmax(dim=1)
  distances = nn.PairwiseDistance(2, eps=eps)(x, x[nn_index])
  return -torch.log(distances + eps).mean()


# --------------------------------------------------------------------------
# Optimiser param groups (dinov2/utils/param_groups.py)


def param_group_rule(name, depth, layer_decay, patch_embed_mult, backbone):
  """``(lr_multiplier, wd_multiplier, is_last_layer)`` of one parameter of a submodule."""
  layer = depth + 1
  if backbone:
    head = name.split('.')[0]
    if head in BACKBONE_LAYER_ZERO:
      layer = 0
    elif head == 'blocks':
      layer = int(name.split('.')[1]) + 1
  lr_mult = layer_decay ** (depth + 1 - layer)
  if 'patch_embed' in name:
    lr_mult *= patch_embed_mult
  no_decay = name.endswith('.bias') or 'norm' in name or 'gamma' in name
  return lr_mult, 0.0 if no_decay else 1.0, 'last_layer' in name


# --------------------------------------------------------------------------
# The meta-architecture


class DinoV2Torch:
  """Student, EMA teacher, losses, AdamW; ``train_step(batch, iteration)`` as ``do_train``."""

  def __init__(self, config, arch):
    """``arch``: our ``VisionTransformer`` (its fields: the architecture to build)."""
    self.config = config
    a = config.augment
    if arch.ffn != 'mlp' or not arch.class_token:
      raise NotImplementedError('the torch reference builds the MLP ViT with a class token')
    self.n_local = int(a.local_crops_number)
    self.separate_ibot_head = bool(config.ibot.separate_head)
    dim = arch.embed_dim

    def backbone(drop_path):
      return ViT(img_size=arch.img_size, patch=arch.patch_size, dim=dim, depth=arch.depth,
                 heads=arch.num_heads, registers=arch.num_registers,
                 layerscale=arch.layerscale_init, drop_path=drop_path, mlp_ratio=arch.mlp_ratio,
                 antialias=arch.interpolate_antialias, offset=arch.interpolate_offset)

    def head(c):
      return DINOHead(dim, c.head_n_prototypes, c.head_hidden_dim, c.head_bottleneck_dim,
                      c.head_nlayers)

    def modules(drop_path):
      d = {'backbone': backbone(drop_path), 'dino_head': head(config.dino)}
      if self.separate_ibot_head:
        d['ibot_head'] = head(config.ibot)
      return nn.ModuleDict(d)

    self.student = modules(float(arch.drop_path_rate))
    self.teacher = modules(0.0)
    for p in self.teacher.parameters():
      p.requires_grad = False
    self.student.train()
    self.teacher.eval()
    k_ibot = (config.ibot if self.separate_ibot_head else config.dino).head_n_prototypes
    self.dino_centre = Centre(config.dino.head_n_prototypes)
    self.ibot_centre = Centre(k_ibot)
    self.schedules = Schedules(config)
    self.optimizer = torch.optim.AdamW(self._param_groups(),
                                       betas=(config.optim.b1, config.optim.b2))

  def _param_groups(self):
    o, groups = self.config.optim, []
    for key, module in self.student.items():
      depth = len(module.blocks) if key == 'backbone' else 0
      for name, p in module.named_parameters():
        lr_mult, wd_mult, last = param_group_rule(name, depth, o.layerwise_decay,
                                                  o.patch_embed_lr_mult, key == 'backbone')
        groups.append({'params': [p], 'lr_multiplier': lr_mult, 'wd_multiplier': wd_mult,
                       'is_last_layer': last, 'name': f'{key}.{name}'})
    return groups

  # --- one iteration ------------------------------------------------------
  def train_step(self, batch, iteration):
    """``batch``: the collated dict from ``collate``. Returns loss terms and schedules."""
    s = self.schedules.at(iteration)
    for g in self.optimizer.param_groups:
      g['weight_decay'] = s['wd'] * g['wd_multiplier']
      g['lr'] = (s['last_layer_lr'] if g['is_last_layer'] else s['lr']) * g['lr_multiplier']
    self.optimizer.zero_grad(set_to_none=True)
    terms = self.forward_backward(batch, s['teacher_temp'])
    clip = self.config.optim.clip_grad
    grad_norms = {}
    for key, module in self.student.items():
      params = [p for p in module.parameters() if p.grad is not None]
      norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
      grad_norms[f'grad_norm/{key}'] = float(norm)
      if clip:
        nn.utils.clip_grad_norm_(module.parameters(), clip)
    self.optimizer.step()
    with torch.no_grad():
      for key in self.student:
        for t, p in zip(self.teacher[key].parameters(), self.student[key].parameters()):
          t.mul_(s['momentum']).add_(p, alpha=1 - s['momentum'])
    return {**terms, **s, **grad_norms}

  @torch.no_grad()
  def _teacher_targets(self, batch, temp):
    n_global = 2
    out = self.teacher['backbone'](batch['global_crops'])
    cls = torch.cat(out['cls'].chunk(n_global)[::-1])  # crop 1 first: matched against crop 0
    masked = out['patches'].flatten(0, 1)[batch['mask_indices']]
    dino_logits = self.teacher['dino_head'](cls)
    ibot_head = self.teacher['ibot_head' if self.separate_ibot_head else 'dino_head']
    ibot_logits = ibot_head(masked)
    n_masked = masked.shape[0]
    if self.config.centering == 'centering':
      dino = self.dino_centre.softmax(dino_logits, temp)
      self.dino_centre.update(dino_logits)
      ibot = self.ibot_centre.softmax(ibot_logits, temp)
      self.ibot_centre.update(ibot_logits)
    elif self.config.centering == 'sinkhorn_knopp':
      dino = sinkhorn_knopp(dino_logits, temp, dino_logits.shape[0])
      ibot = sinkhorn_knopp(ibot_logits, temp, n_masked)
    else:
      raise ValueError(self.config.centering)
    return dino.view(n_global, -1, dino.shape[-1]), ibot

  def forward_backward(self, batch, temp):
    n_global, n_local = 2, self.n_local
    cfg = self.config
    teacher_dino, teacher_ibot = self._teacher_targets(batch, temp)
    n_terms = (n_global - 1) * n_global + max(n_local * n_global, 1)
    student = self.student
    out_global = student['backbone'](batch['global_crops'], masks=batch['masks'])
    student_cls = out_global['cls']
    dino_global_logits = student['dino_head'](student_cls)
    masked = out_global['patches'].flatten(0, 1)[batch['mask_indices']]
    ibot_head = student['ibot_head' if self.separate_ibot_head else 'dino_head']
    ibot_logits = ibot_head(masked)

    terms = {}
    total = 0
    if n_local:
      out_local = student['backbone'](batch['local_crops'])
      local_logits = student['dino_head'](out_local['cls'])
      terms['dino_local'] = dino_cross_entropy(local_logits.chunk(n_local), teacher_dino) / n_terms
      total = total + cfg.dino.loss_weight * terms['dino_local']
    else:
      terms['dino_local'] = torch.zeros(())
    # one student tensor of both crops against the swapped teacher crops, x 2 (loss_scales)
    terms['dino_global'] = dino_cross_entropy(
        [dino_global_logits], [teacher_dino.flatten(0, 1)]) * 2 / n_terms
    total = total + cfg.dino.loss_weight * terms['dino_global']
    terms['koleo'] = sum(koleo(c) for c in student_cls.chunk(2))
    total = total + cfg.dino.koleo_loss_weight * terms['koleo']
    # forward_masked x loss_scales (2) x ibot_loss_scale (1 / 2)
    terms['ibot'] = ibot_masked_loss(ibot_logits, teacher_ibot, batch['masks_weight'],
                                     batch['masks'].shape[0]) * 2 * 0.5
    total = total + cfg.ibot.loss_weight * terms['ibot']
    total.backward()
    terms['loss'] = total
    entropy = -(teacher_dino * torch.log(teacher_dino.clamp_min(1e-30))).sum(-1).mean()
    out = {k: float(v.detach()) for k, v in terms.items()}
    out['teacher_entropy'] = float(entropy)
    return out

  # --- state exchange -----------------------------------------------------
  def centres(self):
    """The centres with this step's update applied (what the next step will use)."""
    return {'center_dino': self.dino_centre.apply_pending()[0].numpy().copy(),
            'center_ibot': self.ibot_centre.apply_pending()[0].numpy().copy()}


def collate(batch):
  """Our batch (NHWC, ``[B, crops, ...]``) -> the reference collate's crop-major NCHW tensors."""
  crop_major = lambda x: torch.from_numpy(
      np.ascontiguousarray(np.swapaxes(np.asarray(x, np.float32), 0, 1))).flatten(0, 1)
  global_crops = crop_major(batch['global_crops']).permute(0, 3, 1, 2).contiguous()
  local_crops = crop_major(batch['local_crops']).permute(0, 3, 1, 2).contiguous()
  masks = torch.from_numpy(np.swapaxes(np.asarray(batch['masks'], bool), 0, 1).copy())
  masks = masks.flatten(0, 1).flatten(1)  # [2B, N]
  mask_indices = masks.flatten().nonzero().flatten()
  counts = masks.sum(-1).clamp(min=1.0)
  masks_weight = (1 / counts).unsqueeze(-1).expand_as(masks)[masks]
  return {'global_crops': global_crops, 'local_crops': local_crops, 'masks': masks,
          'mask_indices': mask_indices, 'masks_weight': masks_weight}


# --------------------------------------------------------------------------
# Our params <-> torch modules. Backbones go through the DINOv2 hub converter
# (tested against timm and HF); the head layout is written out here.


def head_to_torch(flat):
  """Our flat DINOHead params (``mlp/layers_j/kernel`` ...) -> torch state dict."""
  sd = {}
  for name, x in flat.items():
    parts = name.split('/')
    if parts[0] == 'mlp':
      j, leaf = parts[1].split('_')[1], parts[2]
      sd[f'mlp.{j}.{"weight" if leaf == "kernel" else "bias"}'] = x.T if leaf == 'kernel' else x
    else:  # last_layer/weight_v [bneck, K] -> [K, bneck], weight_g [1, K] -> [K, 1]
      sd[f'last_layer.{parts[1]}'] = x.T
  return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()}


def to_torch_state(tree):
  """Our student / teacher tree -> ``{submodule: torch state dict}``."""
  out = {}
  for key, sub in tree.items():
    flat = {k: np.asarray(v) for k, v in flat_params.canonical(sub).items()}
    if key == 'backbone':
      out[key] = {k: torch.from_numpy(np.array(v, np.float32))
                  for k, v in hub.ours_to_hub(flat).items()}
    else:
      out[key] = head_to_torch(flat)
  return out


def load_state(modules: nn.ModuleDict, tree):
  """Copies our tree into the torch modules; every name must match both ways."""
  for key, sd in to_torch_state(tree).items():
    modules[key].load_state_dict(sd, strict=True)
