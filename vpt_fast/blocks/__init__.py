"""Drop-in prompted blocks for timm models."""
from vpt_fast.blocks.swin import SwinBlock, SwinPatchMerging
from vpt_fast.blocks.vit import ViTBlock

__all__ = ["SwinBlock", "SwinPatchMerging", "ViTBlock"]
