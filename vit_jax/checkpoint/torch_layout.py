"""PyTorch's tensor layouts of a ViT's weights <-> the released layout.

A torch `nn.Linear` stores its weight [out, in] (y = x W^T + b), where our
`nn.Dense` kernels are [in, out]; a `nn.Conv2d` weight is [out, in, kh, kw],
our patch-embedding kernel [kh, kw, in, out]. Our attention projections also
keep the heads as their own axis (query/key/value kernel [hidden, heads,
head_dim], bias [heads, head_dim]; out kernel [heads, head_dim, hidden]),
where torch flattens them into heads * head_dim with the head as the slower
axis (Hugging Face's `view(..., heads, head_dim)`, timm's `reshape` do the
same). Each name a converter maps is one of these kinds:

  same      no change (LayerNorm scale/bias, biases, cls token, posemb)
  dense     kernel [in, out]            <-> weight [out, in]
  conv      kernel [kh, kw, in, out]    <-> weight [out, in, kh, kw]
  heads_in  kernel [hidden, h, hd]      <-> weight [h * hd, hidden]
  heads_bias bias [h, hd]               <-> bias [h * hd]
  heads_out kernel [h, hd, hidden]      <-> weight [hidden, h * hd]

vit_jax.checkpoint.hf and vit_jax.checkpoint.timm_layout name the tensors;
this module only moves axes.
"""

from __future__ import annotations

import numpy as np

KINDS = ('same', 'dense', 'conv', 'heads_in', 'heads_bias', 'heads_out')


def to_torch(kind: str, x: np.ndarray) -> np.ndarray:
  """Our array of `kind` in torch's layout (contiguous, ready to save)."""
  if kind == 'same':
    out = x
  elif kind == 'dense':
    out = x.T
  elif kind == 'conv':
    out = x.transpose(3, 2, 0, 1)
  elif kind == 'heads_in':
    out = x.reshape(x.shape[0], -1).T
  elif kind == 'heads_bias':
    out = x.reshape(-1)
  elif kind == 'heads_out':
    out = x.reshape(-1, x.shape[-1]).T
  else:
    raise ValueError(f'unknown tensor kind {kind!r}, not in {KINDS}')
  return np.ascontiguousarray(out)


def from_torch(kind: str, x: np.ndarray, heads: int = 1) -> np.ndarray:
  """Inverse of `to_torch`; the heads kinds need the number of heads."""
  if kind == 'same':
    return x
  if kind == 'dense':
    return x.T
  if kind == 'conv':
    return x.transpose(2, 3, 1, 0)
  if kind == 'heads_in':
    return x.T.reshape(x.shape[1], heads, -1)
  if kind == 'heads_bias':
    return x.reshape(heads, -1)
  if kind == 'heads_out':
    return x.T.reshape(heads, -1, x.shape[0])
  raise ValueError(f'unknown tensor kind {kind!r}, not in {KINDS}')


def torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of an array of ours of `shape`, without any array."""
  if kind == 'same':
    return tuple(shape)
  if kind == 'dense':
    return tuple(shape[::-1])
  if kind == 'conv':
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  if kind == 'heads_in':
    hidden, heads, head_dim = shape
    return (heads * head_dim, hidden)
  if kind == 'heads_bias':
    return (int(np.prod(shape)),)
  if kind == 'heads_out':
    heads, head_dim, hidden = shape
    return (hidden, heads * head_dim)
  raise ValueError(f'unknown tensor kind {kind!r}, not in {KINDS}')
