"""The family table: every timm model class `vpt_fast.prompt` accepts, in one place.

A family is one entry: the timm class, the function that prompts it (which swaps in the family's
block drop-ins and turns the model into its prompted subclass), the timm modules whose registered
models `register_timm` tries, and where the blocks are (one sequence, or stages of blocks). `prompt()`,
the prompt files (`io`), `register_timm` and `PromptBank` read this table; adding a family is a
models module plus one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from timm.models.eva import Eva
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vpt_fast.config import PromptConfig
from vpt_fast.models.eva import PromptedEva, prompt_eva
from vpt_fast.models.swin import PromptedSwinTransformer, prompt_swin
from vpt_fast.models.vit import PromptedVisionTransformer, prompt_vit


@dataclass(frozen=True)
class Family:
    """One prompted model family.

    Args:
        name: short name ("vit", "eva", "swin").
        timm_class: the timm model class (exactly; subclasses are refused by `prompt`).
        prompted_class: the importable class a prompted model becomes.
        prompt: prompts a model of `timm_class` in place (checks everything first).
        timm_modules: timm modules whose models are `register_timm` candidates.
        staged: blocks live in stages (`model.layers[s].blocks`, Swin) rather than `model.blocks`.
    """

    name: str
    timm_class: type
    prompted_class: type
    prompt: Callable[[nn.Module, PromptConfig], nn.Module]
    timm_modules: tuple[str, ...]
    staged: bool = False

    def depth(self, model: nn.Module) -> Union[int, list[int]]:
        """Blocks per model (or per stage)."""
        return [len(stage.blocks) for stage in model.layers] if self.staged else len(model.blocks)


FAMILIES = (
    Family("vit", VisionTransformer, PromptedVisionTransformer, prompt_vit,
           ("vision_transformer", "vision_transformer_hybrid", "deit")),
    Family("eva", Eva, PromptedEva, prompt_eva, ("eva",)),
    Family("swin", SwinTransformer, PromptedSwinTransformer, prompt_swin, ("swin_transformer",), staged=True),
)


def family_of(model: nn.Module) -> Family:
    """The family of a timm model or of a prompted one (TypeError naming the supported classes)."""
    for family in FAMILIES:
        if isinstance(model, family.timm_class):
            return family
    names = ", ".join(f"{f.timm_class.__module__}.{f.timm_class.__name__}" for f in FAMILIES)
    raise TypeError(f"vpt_fast.prompt supports the timm model classes {names}; got "
                    f"{type(model).__module__}.{type(model).__name__}")


def registry_modules() -> tuple[str, ...]:
    """timm modules whose models `register_timm` tries."""
    return tuple(module for family in FAMILIES for module in family.timm_modules)


__all__ = ["FAMILIES", "Family", "family_of", "registry_modules"]
