"""Top-5 classes of image files: `python -m vit_jax.tools.predict ... IMAGE...`.

    python -m vit_jax.tools.predict --workdir=runs/quickstart shoe.png shirt.jpg
    python -m vit_jax.tools.predict --checkpoint=ViT-B_16.npz --model=ViT-B_16 \\
        --image_size=384 --class_names=imagenet_classes.txt cat.jpg

Images may be PNG, JPEG, GIF or BMP of any size, grayscale or colour; each is
resized exactly as evaluation resizes (vit_jax.data.preprocess.eval_preprocess)
and converted to the model's channels. For every image it prints the file name
and one line per class: probability, class name, class index.
"""

from collections.abc import Sequence
import sys

from absl import flags
import jax
import numpy as np

from vit_jax.data import pixel_limit
from vit_jax.tools import cli
from vit_jax.tools import loading


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv  # Only a config_flags flag reads it.
  cli.define_model_flags(fv)
  flags.DEFINE_integer('top_k', 5, 'Classes to print per image.', flag_values=fv)
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.',
                       flag_values=fv)
  loading.define_max_image_pixels_flag(fv)


def class_probabilities(
    trained: loading.TrainedModel, paths: Sequence[str], batch_size: int = 32,
    max_image_pixels: int = pixel_limit.DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
  """Softmax over classes for each image file: float32 [len(paths), classes].

  Every file is decoded first, so a bad file fails before any compute; one of
  over `max_image_pixels` pixels is refused from its header, undecoded.
  """
  images = np.stack([trained.preprocess(loading.read_image(p, max_image_pixels))
                     for p in paths])
  forward = jax.jit(lambda params, x: jax.nn.softmax(
      trained.model.apply({'params': params}, x, train=False)))
  chunks = [forward(trained.params, images[i:i + batch_size])
            for i in range(0, len(images), batch_size)]
  return np.concatenate([np.asarray(c) for c in chunks])


def top_classes(probs: np.ndarray, class_names: Sequence[str],
                k: int = 5) -> list[tuple[float, str, int]]:
  """The k most probable (probability, name, index) of one image, best first.

  Ties go to the lower index, as in evaluation's top-k.
  """
  order = np.argsort(-probs, kind='stable')[:k]
  return [(float(probs[i]), class_names[i], int(i)) for i in order]


def main(fv: flags.FlagValues, paths: list[str]) -> None:
  if not paths:
    raise ValueError('no IMAGE given: python -m vit_jax.tools.predict '
                     '--workdir=DIR IMAGE [IMAGE...]')
  if fv.top_k < 1 or fv.batch_size < 1:
    raise ValueError('--top_k and --batch_size must be >= 1')
  trained = cli.load_model(fv)
  probs = class_probabilities(trained, paths, fv.batch_size,
                              fv.max_image_pixels)
  for path, row in zip(paths, probs):
    print(path)
    for p, name, index in top_classes(row, trained.class_names, fv.top_k):
      print(f'  {p:8.4f}  {name} ({index})')


if __name__ == '__main__':
  sys.exit(cli.run(define_flags, main, doc=__doc__))
