"""Command-line tools around a trained model (run each with `python -m`).

  predict        top-5 classes of image files
  attention_map  per-layer/per-head attention and attention rollout as a PNG
  export         a workdir's params as a released-layout .npz (and safetensors)
  evaluate       top-1/top-5/loss of a checkpoint on any split

`loading` holds what they share: a workdir or released file -> model, params,
class names and the eval preprocessing.
"""

import os

# TensorFlow only decodes and resizes images here; keep its C++ log lines
# (e.g. about an aborted decode of a bad file) out of the tools' output.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
