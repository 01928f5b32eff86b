"""Checkpoints: the run's own Orbax state, and the released `.npz` files.

Two jobs, kept apart:

  orbax_state.py Orbax train-state checkpoints of a workdir: save, verified
                 restore, resume from the newest intact one (damaged ones are
                 moved aside).
  workdir_reader.py  read-only `load_params` / `load_meta` of a workdir, for
                 tools (no train state, never writes).
  npz.py         the released file format: `save_npz`, `load_npz`.
  layouts.py     released <-> Linen <-> big_vision names; per-block <-> scanned.
  posemb.py      position-embedding resize to a new patch grid.
  pretrained.py  `load_pretrained`: any of the above as a fine-tuning start.
  hf.py          Hugging Face ViT directories: write (export), read.
  hf_config.py   their config.json (checked) and preprocessor_config.json.
  timm_layout.py timm ViT state dicts in the released names.
  safetensors_file.py / torch_layout.py  checked .safetensors I/O; torch axes.

The names users call are importable from here (`vit_jax.checkpoint.save_npz`,
`load_npz`, `load_pretrained`, `load_params`); everything else from its module.
"""

from vit_jax.checkpoint.npz import load_npz
from vit_jax.checkpoint.npz import save_npz
from vit_jax.checkpoint.pretrained import load_pretrained
from vit_jax.checkpoint.workdir_reader import load_params

__all__ = ['load_npz', 'load_params', 'load_pretrained', 'save_npz']
