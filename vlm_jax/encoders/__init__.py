"""Image and text towers, one module each."""
from vlm_jax.encoders.resnet import ResNet
from vlm_jax.encoders.text import TextTransformer
from vlm_jax.encoders.vit import ViT, check_images
