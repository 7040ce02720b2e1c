"""VisualPrompts: the trainable prompt parameters of one prompted model (VPT, arXiv 2203.12119).

One module for every model family (docs/design.md §1):
- ViT: one prompt set per prompted block (1 shallow, depth deep) held as ONE parameter `prompts`
  of shape (Lp, P, d), and an optional projection `proj` = Linear(k, D);
- Swin: one parameter per stage, `prompts.<s>` of shape (n_s, P, d_s), and with `project=k` one
  projection per stage, `proj.<s>` = Linear(k, C_s) (the stage widths differ).
The parameter names are the keys of `vpt_fast.prompt_state_dict`.

Initialisation follows the released code: uniform(-v, v) with v = sqrt(6 / (3 * ph * pw + d0)), d0
the stage-0 prompt dimension, for every stage; projections get Kaiming-normal (fan-out) weights.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from vpt_fast.ops import parameters_of
from vpt_fast.prompt_cache import KVCacheOwner, parameter_key


class VisualPrompts(KVCacheOwner):
    """Prompt sets per stage, their optional projections, and prompt dropout.

    Args:
        num_sets: prompt sets per stage, e.g. ViT-B deep (12,), shallow (1,); Swin-T deep (2, 2, 6, 2).
        num_prompts: tokens per set (P).
        widths: model width of every stage that has prompts (D for ViT, C_s for Swin).
        patch_size: (ph, pw) of the backbone, for the paper's initialisation.
        project: prompt dimension k with a trainable Linear(k, width) per stage, or None.
        dropout: prompt dropout probability, applied each time a set enters the sequence.
        per_stage: name parameters per stage (`prompts.<s>`, `proj.<s>`), as Swin does; otherwise
            exactly one stage, named `prompts` and `proj` (ViT).
    """

    def __init__(self, num_sets: Sequence[int], num_prompts: int, widths: Sequence[int],
                 patch_size: tuple[int, int], project: Optional[int] = None, dropout: float = 0.0,
                 per_stage: bool = False) -> None:
        super().__init__()
        if len(num_sets) != len(widths) or not num_sets:
            raise ValueError(f"num_sets {tuple(num_sets)} and widths {tuple(widths)} must be non-empty "
                             f"and of equal length")
        if not per_stage and len(num_sets) != 1:
            raise ValueError(f"per_stage=False holds exactly one stage, got {len(num_sets)}")
        dims = [project or width for width in widths]
        bound = math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + dims[0]))
        sets = [nn.Parameter(torch.empty(n, num_prompts, d).uniform_(-bound, bound)) for n, d in zip(num_sets, dims)]
        projs = None
        if project is not None:
            projs = [nn.Linear(project, width) for width in widths]
            for proj in projs:
                nn.init.kaiming_normal_(proj.weight, a=0, mode="fan_out")
        self.per_stage = per_stage
        self.prompts = nn.ParameterList(sets) if per_stage else sets[0]
        self.proj = (nn.ModuleList(projs) if per_stage else projs[0]) if projs else None
        self.dropout = nn.Dropout(dropout)

    @property
    def num_prompts(self) -> int:
        return self.stage_prompts(0).shape[1]

    def stage_prompts(self, stage: int) -> nn.Parameter:
        """The (n_s, P, d_s) prompt parameter of `stage`."""
        return self.prompts[stage] if self.per_stage else self.prompts

    def state_tensors(self) -> dict[str, Tensor]:
        """The prompt-side entries of `vpt_fast.prompt_state_dict`: every parameter, by name."""
        return dict(self.named_parameters())

    def tokens(self, index: int, batch: int, stage: int = 0) -> Tensor:
        """Set `index` of `stage` as it enters the sequence: (1, P, width) when it is the same for
        every sample, (B, P, width) when prompt dropout draws a mask per sample (as the released
        code, which applies dropout after expanding to the batch)."""
        p = self.clean_tokens(index, stage)
        if self.training and self.dropout.p > 0:
            return self.dropout(p.expand(batch, -1, -1))
        return p

    def clean_tokens(self, index: int, stage: int = 0) -> Tensor:
        """Set `index` of `stage`, projected, before dropout: (1, P, width)."""
        p = self.stage_prompts(stage)[index]
        if not torch.is_grad_enabled():
            # a view of a parameter keeps requires_grad even under no_grad / inference_mode, which
            # trips autograd hooks (FlopCounterMode's module tracker); nothing is differentiated here
            p = p.detach()
        if self.proj is not None:
            p = (self.proj[stage] if self.per_stage else self.proj)(p)
        return p.unsqueeze(0)

    def prompt_sets(self, index: int, batch: int, stage: int = 0) -> tuple[Tensor, Optional[Tensor]]:
        """What block `index` of `stage` reads: (prompt rows, None); see `tokens`. A bank of tasks
        answers (sets (S, P, width), per-sample set index) instead."""
        return self.tokens(index, batch, stage), None

    def cache_key(self) -> Optional[tuple]:
        """Identifies the current prompt values (parameter storage, version, dtype, device), or None
        while prompt dropout draws new rows on every call (nothing to cache)."""
        if self.training and self.dropout.p > 0:
            return None
        return parameter_key(parameters_of(self))
