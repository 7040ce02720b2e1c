"""vpt_fast: fast, memory-lean Visual Prompt Tuning (arXiv 2203.12119) for timm transformers.

    model = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=100)
    model = vpt_fast.prompt(model, num_prompts=50, deep=True)

See docs/design.md §4 for the public API contract.
"""
from vpt_fast.backends import available_backends
from vpt_fast.bank import PromptBank
from vpt_fast.blocks import SwinBlock, SwinPatchMerging, ViTBlock
from vpt_fast.config import PromptConfig
from vpt_fast.io import load_prompt_state_dict, load_prompts, prompt_state_dict, save_prompts
from vpt_fast.precision import cast_frozen
from vpt_fast.prompting import clear_caches, prompt, set_backend, trainable_parameters
from vpt_fast.timm_models import register_timm
from vpt_fast.version import __version__  # noqa: F401  (re-exported)


def ext_info() -> dict:
    """Whether the C++/CUDA extension `vpt_fast._C` is built, and for which architectures."""
    try:
        from vpt_fast.backends.cuda_impl import ext_info as _ext_info
    except ImportError as exc:
        return {"built": False, "error": str(exc)}
    return _ext_info()


__all__ = [
    "PromptBank", "PromptConfig", "SwinBlock", "SwinPatchMerging", "ViTBlock", "available_backends", "cast_frozen",
    "clear_caches", "ext_info",
    "load_prompt_state_dict",
    "load_prompts", "prompt", "prompt_state_dict", "register_timm", "save_prompts", "set_backend",
    "trainable_parameters",
]
