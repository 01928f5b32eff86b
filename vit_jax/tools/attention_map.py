"""Where a ViT looks: per-layer/per-head attention and attention rollout as a PNG.

    python -m vit_jax.tools.attention_map --workdir=runs/quickstart \\
        --image=shoe.png --out=map.png
    python -m vit_jax.tools.attention_map --checkpoint=ViT-B_16.npz \\
        --model=ViT-B_16 --image_size=384 --image=cat.jpg --out=map.png

The attention probabilities come from the model itself: every attention layer
sows them (`intermediates/.../attention_weights`, [batch, heads, q, k]) and
`model.apply(..., mutable=['intermediates'])` collects them; the parameters are
untouched. Each panel overlays a map on the model's input image (resized as in
evaluation) and is scaled to its own maximum. What the maps show:

  Per layer and head (one row per layer, one column per head, last column the
  mean over heads), the attention of the token the classifier reads:
    classifier 'token' (and 'token_unpooled'): the cls token's attention row
      over the patches (the cls column itself is not drawn);
    'gap', 'map', 'unpooled': there is no such token, so the map is the mean
      attention each patch *receives*, averaged over all query tokens.
  Attention rollout (Abnar & Zuidema, 2020; first row): in every layer average
  the heads, add the identity for the residual path and renormalise the rows,
  then multiply the layers; the row drawn is the cls token's ('token'), the
  mean row ('gap': the pooled output is the mean of the tokens), or the MAP
  probe's head-averaged attention times the rollout ('map').

MLP-Mixer, GFNet and AFNO models have no attention weights; they are refused
with a message saying how they mix tokens. A FAVOR+ model never forms its
attention matrix either: what is drawn for it is the exact softmax attention of
its own queries and keys (the matrix FAVOR+ estimates), and the figure and the
output say so. A model with token merging (tome_r > 0) is refused: its later
layers attend over merged tokens, which no longer form the patch grid.
"""

import dataclasses
import sys

from absl import flags
import jax
import matplotlib
import numpy as np

from vit_jax.models import VisionTransformer
from vit_jax.tools import cli
from vit_jax.tools import loading

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

_CLS_CLASSIFIERS = ('token', 'token_unpooled')


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv  # Only a config_flags flag reads it.
  cli.define_model_flags(fv)
  flags.DEFINE_string('image', None, 'Image file (PNG/JPEG/GIF/BMP).',
                      flag_values=fv)
  loading.define_max_image_pixels_flag(fv)
  flags.DEFINE_string('out', 'attention_map.png', 'PNG file to write.',
                      flag_values=fv)
  flags.DEFINE_string('layers', 'all', "Layers to draw: 'all' or indices such "
                      "as '0,5,11' (rollout always uses every layer).",
                      flag_values=fv)


@dataclasses.dataclass(frozen=True)
class Attention:
  """A forward pass's attention, as needed for drawing.

  Attributes:
    weights: float32 [layers, heads, tokens, tokens], rows are queries.
    probe: MAP head's attention [heads, tokens], or None.
    classifier: the model's classifier ('token', 'gap', 'map', ...).
    grid: patch grid (h, w); tokens = num_prefix + h * w.
    image: the model input, float32 [size, size, channels] in [-1, 1].
    probs: class probabilities [classes].
    note: what the maps are, when they are not the model's own weights.
  """
  weights: np.ndarray
  probe: np.ndarray | None
  classifier: str
  grid: tuple[int, int]
  image: np.ndarray
  probs: np.ndarray
  note: str = ''

  @property
  def num_prefix(self) -> int:
    return 1 if self.classifier in _CLS_CLASSIFIERS else 0


def collect_attention(trained: loading.TrainedModel,
                      image: np.ndarray) -> Attention:
  """Runs the model on one uint8 image [H, W, C] and gathers its attention."""
  model = trained.model
  if not isinstance(model, VisionTransformer):
    raise ValueError(f'{type(model).__name__} has no attention layers (MLP-Mixer '
                     'mixes tokens with MLPs); attention maps need a ViT.')
  if model.token_mixer != 'attention':
    how = {'global_filter': "a global filter (GFNet's)", 'afno': 'AFNO'}
    raise ValueError(
        f'this model mixes tokens with {how[model.token_mixer]} in the frequency '
        'domain: it has no attention weights to draw.')
  if getattr(model, 'tome_r', 0):
    raise ValueError(
        f'this model merges tokens (ToMe, tome_r={model.tome_r}): after block '
        '0 its attention is over merged tokens, not the patch grid the maps '
        'draw. Its parameters are a plain ViT\'s: export them '
        '(vit_jax.tools.export) and draw with --checkpoint and --model.')
  note = ''
  if model.attention_impl == 'favor':
    note = ('FAVOR+ never forms attention weights: drawn is the exact softmax '
            'attention of its queries and keys, which FAVOR+ estimates')
  # The fused kernel and FAVOR+ do not expose probabilities; same params.
  model = model.clone(attention_impl='xla')
  x = trained.preprocess(image)
  logits, state = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, train=False, mutable=['intermediates']))(
          trained.params, x[None])
  sown = jax.device_get(state['intermediates'])
  blocks = sown['Transformer']
  weights = np.stack([
      blocks[f'encoderblock_{i}']['MultiHeadDotProductAttention_1']
      ['attention_weights'][0][0] for i in range(model.num_layers)])
  probe = None
  if model.classifier == 'map':
    probe = sown['MAPHead_0']['MultiHeadDotProductAttention_0'][
        'attention_weights'][0][0, :, 0]
  num_prefix = 1 if model.classifier in _CLS_CLASSIFIERS else 0
  side = int(round(np.sqrt(weights.shape[-1] - num_prefix)))
  return Attention(
      weights=weights.astype(np.float32), probe=probe,
      classifier=model.classifier, grid=(side, side), image=x,
      probs=np.asarray(jax.nn.softmax(logits[0])), note=note)


def head_maps(att: Attention) -> np.ndarray:
  """[layers, heads, h, w]: the classifier token's row, or attention received."""
  if att.num_prefix:
    rows = att.weights[:, :, 0, :]
  else:
    rows = att.weights.mean(axis=2)
  return rows[..., att.num_prefix:].reshape(*rows.shape[:2], *att.grid)


def rollout(weights: np.ndarray) -> np.ndarray:
  """Attention rollout [tokens, tokens] of per-layer weights [L, heads, T, T].

  Row i says how much each input token contributes to output token i through
  attention and residual paths (Abnar & Zuidema, 2020).
  """
  tokens = weights.shape[-1]
  result = np.eye(tokens, dtype=np.float64)
  for layer in weights:
    a = layer.mean(axis=0) + np.eye(tokens)
    a /= a.sum(axis=-1, keepdims=True)
    result = a @ result
  return result


def rollout_map(att: Attention) -> np.ndarray:
  """[h, w]: the rollout row of what the classifier reads (see module doc)."""
  rolled = rollout(att.weights)
  if att.num_prefix:
    row = rolled[0]
  elif att.probe is not None:
    row = att.probe.mean(axis=0) @ rolled
  else:
    row = rolled.mean(axis=0)
  return row[att.num_prefix:].reshape(att.grid)


def _parse_layers(spec: str, num_layers: int) -> list[int]:
  if spec.strip() == 'all':
    return list(range(num_layers))
  try:
    layers = [int(s) for s in spec.split(',') if s.strip()]
  except ValueError:
    raise ValueError(f"--layers={spec!r}: 'all' or comma-separated indices") from None
  bad = [i for i in layers if not 0 <= i < num_layers]
  if bad or not layers:
    raise ValueError(f'--layers={spec!r}: the model has layers 0-{num_layers - 1}')
  return layers


def render(att: Attention, out: str, *, title: str = '',
           layers: list[int] | None = None) -> None:
  """Writes the PNG: rollout in the first row, then one row per layer."""
  maps = head_maps(att)
  layers = list(range(len(maps))) if layers is None else layers
  heads = maps.shape[1]
  cols = max(heads + 1, 3)
  fig, axes = plt.subplots(1 + len(layers), cols, squeeze=False,
                           figsize=(1.4 * cols, 1.5 * (1 + len(layers))))
  size = att.image.shape[0]
  picture = (att.image + 1.0) / 2.0
  picture = picture[..., 0] if picture.shape[-1] == 1 else picture
  extent = (0, size, size, 0)

  def panel(ax, heat: np.ndarray | None, label: str) -> None:
    ax.imshow(picture, cmap='gray', vmin=0.0, vmax=1.0, extent=extent)
    if heat is not None:
      ax.imshow(heat / max(float(heat.max()), 1e-12), cmap='inferno',
                alpha=0.6, vmin=0.0, vmax=1.0, extent=extent,
                interpolation='nearest')
    ax.set_title(label, fontsize=7)

  panel(axes[0, 0], None, 'input')
  panel(axes[0, 1], rollout_map(att), 'rollout')
  if att.probe is not None:
    probe = att.probe.mean(axis=0).reshape(att.grid)
    panel(axes[0, 2], probe, 'MAP probe')
  query = 'cls token' if att.num_prefix else 'received (mean over queries)'
  for row, layer in enumerate(layers, start=1):
    for head in range(heads):
      panel(axes[row, head], maps[layer, head], f'L{layer} H{head}')
    panel(axes[row, heads], maps[layer].mean(axis=0), f'L{layer} mean')
  for ax in axes.flat:
    ax.axis('off')
  note = f'\n{att.note}' if att.note else ''
  fig.suptitle(f'{title}\nper-head attention: {query}{note}', fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def main(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise ValueError(f'unexpected arguments {args}; pass the image as --image')
  if not fv.image:
    raise ValueError('--image is required')
  cli.check_output_path(fv.out, 'out')
  image = loading.read_image(fv.image, fv.max_image_pixels)
  trained = cli.load_model(fv)
  att = collect_attention(trained, image)
  layers = _parse_layers(fv.layers, att.weights.shape[0])
  best = int(np.argmax(att.probs))
  title = (f'{fv.image}: {trained.class_names[best]} '
           f'({att.probs[best]:.2f}), classifier={att.classifier}')
  render(att, fv.out, title=title, layers=layers)
  if att.note:
    print(f'note: {att.note}')
  print(f'wrote {fv.out}')


if __name__ == '__main__':
  sys.exit(cli.run(define_flags, main, doc=__doc__))
