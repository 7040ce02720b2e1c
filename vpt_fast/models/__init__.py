"""Prompted timm model families: `PromptedVisionTransformer`, `PromptedSwinTransformer`.

Import the families from their modules (`vpt_fast.models.vit`, `vpt_fast.models.swin`); this package
imports nothing itself, so `vpt_fast.models.common` loads without timm's model zoo.
"""
