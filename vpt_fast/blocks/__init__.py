"""Drop-in prompted blocks for timm models."""
from vpt_fast.blocks.vit import ViTBlock

__all__ = ["ViTBlock"]
