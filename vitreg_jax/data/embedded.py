"""The embedded dataset: procedurally drawn shapes, no download, fully deterministic.

Every image is a function of ``(seed, split, index)``, drawn on demand, so the
dataset costs no disk, behaves identically on every host, and can be sized for
a unit test (a few 32-px images) or for a CPU quickstart (thousands of 96-px
images). Each image holds one large *dominant* shape (its class label) and a
few smaller distractors, drawn in saturated colours over a muted textured
background. That gives:

* a classification task that random-init features solve poorly (shape, not
  colour or position, decides the class; colours and backgrounds are shared by
  all classes) but self-supervised features can learn (kNN probe);
* ground-truth boxes whose first entry is a salient, un-occluded object, so
  unsupervised object discovery (LOST CorLoc) is measurable;
* a caption per image ("a red circle above a small blue square") for CLIP.

Records follow the source convention of :mod:`vitreg_jax.data.sources`:
``image`` uint8 ``[S, S, 3]``, ``label`` int, ``boxes`` float32 ``[n, 4]``
(x0, y0, x1, y1 normalised to [0, 1], dominant object first), ``box_labels``
int32 ``[n]``, ``caption`` str.
"""

import dataclasses
import math

import numpy as np

SHAPES = ('circle', 'square', 'triangle', 'cross', 'diamond', 'ring', 'star', 'hexagon')

# Saturated object colours; backgrounds are drawn from muted tints instead, so
# objects stand out from any background but colour carries no class signal.
COLOURS = {
    'red': (215, 40, 40),
    'green': (40, 165, 60),
    'blue': (40, 80, 215),
    'yellow': (235, 200, 35),
    'purple': (140, 55, 180),
    'orange': (240, 135, 25),
    'cyan': (30, 190, 200),
    'pink': (235, 110, 170),
}
TEXTURES = ('gradient', 'stripes', 'checker', 'clouds')
SPLITS = ('train', 'val')


@dataclasses.dataclass(frozen=True)
class EmbeddedConfig:
  """Size and content knobs of the embedded dataset."""
  image_size: int = 96
  num_train: int = 2048
  num_val: int = 512
  num_classes: int = 8
  max_objects: int = 3  # dominant shape + up to max_objects - 1 distractors
  seed: int = 0

  def __post_init__(self):
    if not 1 <= self.num_classes <= len(SHAPES):
      raise ValueError(f'embedded.num_classes must be in [1, {len(SHAPES)}] (shapes {SHAPES}), '
                       f'got {self.num_classes}')
    if self.image_size < 16:
      raise ValueError(f'embedded.image_size must be >= 16, got {self.image_size}')
    if self.max_objects < 1:
      raise ValueError(f'embedded.max_objects must be >= 1, got {self.max_objects}')
    if self.num_train < 1 or self.num_val < 1:
      raise ValueError(f'embedded.num_train/num_val must be >= 1, got {self.num_train}/{self.num_val}')


def _shape_mask(kind, u, v):
  """Inside-test of a unit-size shape in rotated, radius-normalised coordinates."""
  r2 = u * u + v * v
  if kind == 'circle':
    return r2 <= 1.0
  if kind == 'square':
    return np.maximum(np.abs(u), np.abs(v)) <= 0.78
  if kind == 'diamond':
    return np.abs(u) + np.abs(v) <= 1.0
  if kind == 'cross':
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
  if kind == 'ring':
    return (r2 <= 1.0) & (r2 >= 0.36)
  if kind in ('triangle', 'hexagon'):
    sides = 3 if kind == 'triangle' else 6
    inradius = math.cos(math.pi / sides)
    inside = np.ones(u.shape, bool)
    for k in range(sides):
      angle = 2 * math.pi * k / sides - math.pi / 2
      inside &= u * math.cos(angle) + v * math.sin(angle) <= inradius
    return inside
  if kind == 'star':
    theta = np.arctan2(v, u)
    reach = 0.42 + 0.58 * ((1 + np.cos(5 * theta)) / 2) ** 2
    return r2 <= reach * reach
  raise ValueError(f'unknown shape {kind!r}; valid: {SHAPES}')


def _background(rng, size):
  """A muted, textured background (float32 [S, S, 3] in 0..255)."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  grey = rng.uniform(70, 170, size=2)
  tint = rng.uniform(-25, 25, size=(2, 3))
  c0, c1 = grey[0] + tint[0], grey[1] + tint[1]
  texture = TEXTURES[rng.integers(len(TEXTURES))]
  angle = rng.uniform(0, 2 * np.pi)
  along = xx * np.cos(angle) + yy * np.sin(angle)
  if texture == 'gradient':
    t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
  elif texture == 'stripes':
    t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 9) * along)
  elif texture == 'checker':
    cells = rng.integers(3, 9)
    t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
  else:  # clouds: smooth noise, bilinear upsampling of a coarse random grid
    coarse = rng.uniform(0, 1, size=(5, 5)).astype(np.float32)
    pos = np.linspace(0, 4, size, dtype=np.float32)
    i0 = np.minimum(pos.astype(int), 3)
    f = pos - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    t = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
  t = t[..., None].astype(np.float32)
  image = c0 * (1 - t) + c1 * t
  return image + rng.normal(0, 6, size=image.shape).astype(np.float32)


def _place(rng, size, radius, occupied):
  """A centre for a shape of this radius, inside the image, off earlier shapes."""
  for _ in range(20):
    cx, cy = rng.uniform(radius, size - radius, size=2)
    if all(math.hypot(cx - ox, cy - oy) > radius + orad + 1 for ox, oy, orad in occupied):
      return cx, cy
  return None


def _relation(dominant, other):
  """Where ``dominant`` sits relative to ``other``, in caption words."""
  dx, dy = dominant[0] - other[0], dominant[1] - other[1]
  if abs(dx) >= abs(dy):
    return 'to the left of' if dx < 0 else 'to the right of'
  return 'above' if dy < 0 else 'below'


def render(config: EmbeddedConfig, split: str, index: int) -> dict:
  """Draws record ``index`` of ``split``; the same arguments give the same record."""
  if split not in SPLITS:
    raise ValueError(f'embedded split must be one of {SPLITS}, got {split!r}')
  size = config.image_size
  rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
  image = _background(rng, size)
  label = int(rng.integers(config.num_classes))
  colour_names = list(COLOURS)

  # Dominant shape first in the record, but drawn last so nothing occludes it.
  dominant_radius = rng.uniform(0.2, 0.32) * size
  objects = [(label, dominant_radius)]
  for _ in range(int(rng.integers(0, config.max_objects))):
    objects.append((int(rng.integers(len(SHAPES))), rng.uniform(0.07, 0.13) * size))
  occupied, placed = [], []
  for shape_id, radius in objects:
    centre = _place(rng, size, radius, occupied)
    if centre is None:
      continue
    occupied.append((*centre, radius))
    placed.append((shape_id, radius, centre, int(rng.integers(len(colour_names))),
                   rng.uniform(0, 2 * np.pi)))

  boxes = [None] * len(placed)
  for order in list(range(1, len(placed))) + [0]:
    shape_id, radius, (cx, cy), colour_id, angle = placed[order]
    x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, size)
    y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, size)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    mask = _shape_mask(SHAPES[shape_id], u, v)
    shade = 1.0 - 0.15 * (dy + 1) / 2  # a little top-lit shading
    colour = np.asarray(COLOURS[colour_names[colour_id]], np.float32)
    patch = image[y0:y1, x0:x1]
    patch[mask] = (colour * shade[..., None])[mask]
    rows, cols = np.nonzero(mask)
    boxes[order] = (x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1)

  def noun(o, small=False):
    words = ('small ' if small else '') + f'{colour_names[placed[o][3]]} {SHAPES[placed[o][0]]}'
    return ('an ' if words[0] in 'aeiou' else 'a ') + words

  if len(placed) > 1:
    other = max(range(1, len(placed)), key=lambda o: placed[o][1])
    caption = f'{noun(0)} {_relation(placed[0][2], placed[other][2])} {noun(other, small=True)}'
  else:
    caption = f'{noun(0)} on its own'
  return {
      'image': np.clip(image + 0.5, 0, 255).astype(np.uint8),
      'label': label,
      'boxes': np.asarray(boxes, np.float32).reshape(-1, 4) / size,
      'box_labels': np.asarray([p[0] for p in placed], np.int32),
      'caption': caption,
  }
