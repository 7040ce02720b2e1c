"""PromptConfig: how a timm model is prompted (docs/design.md §1, §4)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from vpt_fast.backends import validate_backend

RECOMPUTE = ("none", "mlp", "block")


@dataclass
class PromptConfig:
    """Visual Prompt Tuning settings.

    Args:
        num_prompts: prompt tokens per prompted block (P in the paper), at least 1.
        deep: VPT-Deep (a new prompt set before every block) instead of VPT-Shallow (input only).
        dropout: prompt dropout probability, applied each time prompts enter the sequence.
        project: if set, prompts live in this dimension and pass through a trainable Linear to the
            model width (the paper's `prompt_project`).
        backend: one of `vpt_fast.backends.BACKENDS` (see `available_backends()`).
        recompute: "none" (save what input gradients need), "mlp" (recompute norm2+fc1 in backward),
            "block" (save block inputs only and recompute each block in backward).
    """

    num_prompts: int = 50
    deep: bool = True
    dropout: float = 0.0
    project: Optional[int] = None
    backend: str = "auto"
    recompute: str = "none"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field (RuntimeError: backend unavailable)."""
        if not _is_int(self.num_prompts) or self.num_prompts < 1:
            raise ValueError(f"num_prompts must be an integer >= 1, got {self.num_prompts!r}")
        if not isinstance(self.deep, bool):
            raise TypeError(f"deep must be a bool (True: VPT-Deep, False: VPT-Shallow), got {self.deep!r}")
        dropout = self.dropout
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if self.project is not None and (not _is_int(self.project) or self.project < 1):
            raise ValueError(f"project must be None or an integer >= 1 (the prompt dimension), got {self.project!r}")
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a string, got {self.backend!r}")
        validate_backend(self.backend)
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

