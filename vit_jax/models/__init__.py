"""Model family: ViT (all paper variants), R+ViT hybrids, MLP-Mixer."""

from vit_jax.models.attention import MultiHeadDotProductAttention
from vit_jax.models.mixer import MlpMixer
from vit_jax.models.registry import check_config
from vit_jax.models.registry import check_image_size
from vit_jax.models.registry import create_model
from vit_jax.models.registry import get_model_config
from vit_jax.models.registry import list_models
from vit_jax.models.registry import model_section
from vit_jax.models.vit import VisionTransformer
from vit_jax.models.vit import posemb_sincos_2d

__all__ = [
    'MultiHeadDotProductAttention', 'MlpMixer', 'VisionTransformer',
    'check_config', 'check_image_size', 'create_model', 'get_model_config',
    'list_models', 'model_section', 'posemb_sincos_2d',
]
