"""PromptBank: many VPT tasks served (and trained) by one backbone copy, in one batch (docs/design.md §8).

Every task adds only its prompts (+ projection) and its classifier head. A mixed batch runs ONE
backbone pass: each block reads a table of every task's prompt keys/values and each sample's
attention takes its own task's set by index (`attention(..., prompt_index=...)`); each sample
then goes through its own task's head. Exact: a task's logits equal its own prompted model's on its
samples, and a mixed training batch gives each task the gradients separate per-task steps would (for
the sum of per-task losses); the per-task prompt-gradient reduction is a fixed-order GEMM.

    bank = vpt_fast.PromptBank(model)             # a prompted model fixes backbone, P, deep, project
    bank.add("cifar100", "cifar100.safetensors")  # a save_prompts file, a prompt state dict, or a prompted model
    out = bank(images, ["cifar100", "dtd", ...])  # or an int tensor of task ids (order of `task_names`)
    out["dtd"]                                     # logits of the dtd samples, in batch order
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vpt_fast import backbone, fsdp
from vpt_fast.io import (
    BACKBONE_FIELDS,
    check_entry,
    check_metadata,
    configuration_metadata,
    metadata_differences,
    read_prompt_file,
    trainable_tensors,
)
from vpt_fast.ops import parameters_of
from vpt_fast.ops.attention import gather_prompt_sets
from vpt_fast.prompt_cache import KVCacheOwner, parameter_key
from vpt_fast.prompting import prompts_of
from vpt_fast.prompts import VisualPrompts

TaskSource = Union[str, os.PathLike, Mapping[str, Tensor], nn.Module]
# Metadata fields a task need not share with the bank (each task has its own head).
_ANY_HEAD = ("num_classes",)


class Task(nn.Module):
    """One task's trainable state: its prompts (`vpt`) and its classifier (`head`)."""

    def __init__(self, prompts: VisualPrompts, head: nn.Module) -> None:
        super().__init__()
        self.vpt, self.head = prompts, head

    def state_tensors(self) -> dict[str, Tensor]:
        """Named as `vpt_fast.prompt_state_dict` names them."""
        named = dict(self.vpt.state_tensors())
        named.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        return named


class TaskPrompts:
    """The prompt source (`PromptSource`) of a mixed batch: every listed task's sets, stacked, read by sample index.

    Without prompt dropout a block reads the stacked sets (S, P, width) and the per-sample index;
    with prompt dropout active, every sample gets its own task's rows with its own mask (B, P, width),
    as a single-task model would draw them.
    """

    def __init__(self, bank: "PromptBank", tasks: Sequence[Task], index: Tensor) -> None:
        self.bank, self.tasks, self.index = bank, list(tasks), index

    def _dropout_active(self) -> bool:
        return any(t.vpt.training and t.vpt.dropout.p > 0 for t in self.tasks)

    def prompt_sets(self, index: int, batch: int, stage: int = 0) -> tuple[Tensor, Optional[Tensor]]:
        if not self._dropout_active():
            return torch.cat([t.vpt.tokens(index, batch, stage) for t in self.tasks]), self.index
        rows = gather_prompt_sets(torch.cat([t.vpt.clean_tokens(index, stage) for t in self.tasks]), self.index)
        out = rows
        for s, task in enumerate(self.tasks):
            if task.vpt.training and task.vpt.dropout.p > 0:
                mine = (self.index == s)[:, None, None]
                out = torch.where(mine, task.vpt.dropout(rows), out)
        return out, None

    def cache_key(self) -> Optional[tuple]:
        if self._dropout_active():
            return None
        return tuple(id(t) for t in self.tasks), parameter_key(parameters_of(*(t.vpt for t in self.tasks)))

    @property
    def kv_cache(self) -> dict:
        return self.bank.kv_cache


class PromptBank(KVCacheOwner):
    """Several VPT tasks on one prompted backbone.

    Args:
        model: a prompted timm model (`vpt_fast.prompt`); it fixes the backbone, the number of
            prompts, deep/shallow and the projection. Its own prompts and head are not a task; add
            them with `bank.add(name, model)` if wanted. The backbone is shared, not copied:
            `bank.parameters()` holds the tasks' prompts and heads only, and `bank.to(...)` moves the
            backbone too. The bank starts in the model's mode (`model.training`); tasks added later
            take the bank's.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        prompts_of(model)
        object.__setattr__(self, "model", model)  # shared, not a submodule: parameters() = the tasks'
        self.tasks = nn.ModuleDict()
        self.train(model.training)

    # -- tasks ----------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        """Task names in the order task ids refer to."""
        return list(self.tasks.keys())

    def add(self, name: str, source: TaskSource, check_backbone: bool = True,
            metadata: Optional[Mapping[str, str]] = None) -> Task:
        """Add a task; anything that does not fit the bank is refused with an error naming it.

        Args:
            name: the task's name (task ids follow the order of addition).
            source: a `save_prompts` file, a `prompt_state_dict`, or a prompted model. It must have the
                bank's prompt configuration (family, P, deep/shallow, projection, width, depth) and head
                configuration (pooling, fc_norm, class/register tokens, norm_pre); any number of classes.
            check_backbone: refuse a task trained on another backbone than the bank's: a model whose
                module structure or frozen weights (parameters and buffers) differ, a file whose
                recorded architecture, geometry, structure or weight signature differ. False adds it
                anyway (its logits in the bank are then not its own model's).
            metadata: for a state dict, the `vpt_fast.io.metadata` of the model it came from (as
                `read_prompt_file` returns it), checked like a file's. A state dict without it carries
                no record of its backbone: a warning says so.
        """
        if fsdp.is_sharded(self.model) or fsdp.is_sharded(self):
            raise RuntimeError("PromptBank.add after fully_shard: add every task first, then shard the model "
                               "and the bank (docs/design.md §7); a task copies the model's prompt module, "
                               "which sharding has turned into slices")
        if isinstance(name, str) and name in self.tasks:
            raise ValueError(f"task {name!r} is already in the bank")
        if not isinstance(name, str) or not name or "." in name or hasattr(self.tasks, name):
            raise ValueError(f"task name must be a non-empty string without '.' that is not an attribute of "
                             f"nn.ModuleDict (the tasks are held in one), got {name!r}")
        if metadata is not None and not isinstance(source, Mapping):
            raise TypeError("metadata= describes a state dict source; files and models carry their own")
        if isinstance(source, nn.Module):
            self._check_model(name, source, check_backbone)
            state = {n: t.detach() for n, t in trainable_tensors(source).items()}
        elif isinstance(source, (str, os.PathLike)):
            state, meta = read_prompt_file(source)
            check_metadata(meta, self.model, f"task {name!r} ({os.fspath(source)})", check_backbone, _ANY_HEAD)
        elif isinstance(source, Mapping):
            state = dict(source)
            if metadata is not None:
                check_metadata(dict(metadata), self.model, f"task {name!r}", check_backbone, _ANY_HEAD)
            elif check_backbone:
                warnings.warn(f"task {name!r} is a state dict without metadata: nothing records the backbone it "
                              f"was trained on, so it cannot be checked against the bank's. Add a save_prompts "
                              f"file or the task's model, or pass metadata=vpt_fast.io.metadata(task_model) "
                              f"(check_backbone=False: you vouch for it)", stacklevel=2)
        else:
            raise TypeError(f"a task comes from a file path, a prompt state dict or a prompted model, "
                            f"got {type(source).__name__}")
        task = self._new_task(name, state)
        names = task.state_tensors()
        missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
        if missing or unexpected:
            raise ValueError(f"task {name!r} does not match the bank: missing {missing}, unexpected {unexpected}")
        for entry, target in names.items():
            check_entry(entry, state[entry], target)
        with torch.no_grad():
            for entry, target in names.items():
                target.copy_(state[entry])
        task.train(self.training)
        self.tasks[name] = task
        return task

    def _check_model(self, name: str, model: nn.Module, check_backbone: bool) -> None:
        """A task model fits when its prompt and head configuration are the bank's and (with
        `check_backbone`) its backbone computes the same function: same module structure (types and
        settings) and the same frozen parameters and buffers, compared both ways, exactly, in the
        bank's dtype and device."""
        prompts_of(model)
        if type(model) is not type(self.model):
            raise ValueError(f"task {name!r} does not match the bank: model family {type(model).__name__} vs "
                             f"{type(self.model).__name__}")
        mine = configuration_metadata(self.model)
        fields = [k for k in mine if k not in _ANY_HEAD and (check_backbone or k not in BACKBONE_FIELDS)]
        diffs = metadata_differences(configuration_metadata(model), mine, fields)
        if diffs:
            field, (theirs, ours) = next(iter(diffs.items()))
            raise ValueError(f"task {name!r} does not match the bank: {field} is {theirs} in the task, "
                             f"{ours} in the bank")
        if not check_backbone:
            return
        difference = (backbone.structure_difference(backbone.structure(model), backbone.structure(self.model),
                                                    ("the task's", "the bank's"))
                      or backbone.exact_weights_difference(model, self.model))
        if difference is not None:
            raise ValueError(f"task {name!r} was made on another backbone: {difference}. The bank runs every task "
                             f"on its own backbone, where this task's logits would not be its model's "
                             f"(check_backbone=False adds it anyway)")

    def _new_task(self, name: str, state: Mapping[str, Tensor]) -> Task:
        template = self.model.vpt
        for entry, target in template.state_tensors().items():
            got = state.get(entry)
            if got is not None and tuple(got.shape) != tuple(target.shape):
                raise ValueError(f"task {name!r} does not match the bank: {entry} has shape {tuple(got.shape)}, "
                                 f"the bank's {_field_hint(entry, target, got)} expects {tuple(target.shape)}")
        prompts = copy.deepcopy(template)
        weight = state.get("head.weight")
        if weight is None or weight.dim() != 2:
            raise ValueError(f"task {name!r} needs a 'head.weight' of shape (classes, features), "
                             f"got {None if weight is None else tuple(weight.shape)}")
        features = self.model.get_classifier().in_features
        if weight.shape[1] != features:
            raise ValueError(f"task {name!r} does not match the bank: head.weight has {weight.shape[1]} input "
                             f"features, the backbone gives {features} (embed dim)")
        param = next(template.parameters())
        head = nn.Linear(features, weight.shape[0], bias="head.bias" in state, device=param.device, dtype=param.dtype)
        return Task(prompts, head)

    def prompt_state_dict(self, name: str) -> dict[str, Tensor]:
        """Task `name`'s prompts (+ projection) and head, with `vpt_fast.prompt_state_dict`'s keys."""
        return {n: t.detach().clone() for n, t in self._task(name).state_tensors().items()}

    def _task(self, name: str) -> Task:
        if name not in self.tasks:
            raise KeyError(f"unknown task {name!r}; the bank has {self.task_names}")
        return self.tasks[name]

    # -- forward --------------------------------------------------------------------------------
    def task_index(self, tasks: Union[Sequence[str], Tensor], batch: int, device: torch.device) -> Tensor:
        """Task ids (B,) from names or ids, checked."""
        if isinstance(tasks, Tensor):
            if tasks.dim() != 1 or tasks.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"tasks must be a 1-dim integer tensor of task ids, got {tasks.dtype} "
                                 f"{tuple(tasks.shape)}")
            index = tasks.to(device=device, dtype=torch.long)
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self.tasks)):
                raise ValueError(f"task ids must be in [0, {len(self.tasks)}), got {index.tolist()}")
        else:
            names = self.task_names
            unknown = sorted({t for t in tasks if t not in self.tasks})
            if unknown:
                raise KeyError(f"unknown task(s) {unknown}; the bank has {names}")
            position = {n: i for i, n in enumerate(names)}
            index = torch.tensor([position[t] for t in tasks], dtype=torch.long, device=device)
        if index.shape[0] != batch:
            raise ValueError(f"tasks must name one task per image: {index.shape[0]} for a batch of {batch}")
        return index

    def forward(self, images: Tensor, tasks: Union[Sequence[str], Tensor]) -> dict[str, Tensor]:
        """{task name: logits of that task's samples, in batch order} for the tasks present."""
        if not self.tasks:
            raise ValueError("the bank has no tasks: add some with bank.add(name, source)")
        index = self.task_index(tasks, images.shape[0], images.device)
        names = self.task_names
        present = torch.unique(index).tolist()
        if torch.is_grad_enabled():  # train only what is present; without gradients the table is cached whole
            remap = torch.full((len(names),), -1, dtype=torch.long, device=index.device)
            remap[present] = torch.arange(len(present), device=index.device)
            source = TaskPrompts(self, [self.tasks[names[t]] for t in present], remap[index])
        else:
            source = TaskPrompts(self, list(self.tasks.values()), index)
        fsdp.register_forward_method(self.model, "forward_pre_logits")  # FSDP2: gather the root first
        pooled = self.model.forward_pre_logits(images, source=source)
        out = {}
        for t in present:
            rows = (index == t).nonzero().squeeze(1)
            out[names[t]] = self.tasks[names[t]].head(pooled.index_select(0, rows))
        return out

    def logits(self, images: Tensor, task_ids: Tensor) -> Tensor:
        """(B, C_max): sample b's logits under task `task_ids[b]`, padded with -inf past that task's
        classes. One static graph, for `torch.compile(fullgraph=True)` and `torch.export`: every
        head runs on every sample (cheap next to the backbone) and each sample keeps its own task's."""
        if not self.tasks:
            raise ValueError("the bank has no tasks: add some with bank.add(name, source)")
        if not torch.compiler.is_compiling():
            task_ids = self.task_index(task_ids, images.shape[0], images.device)
            fsdp.register_forward_method(self.model, "forward_pre_logits")  # FSDP2: gather the root first
        tasks = list(self.tasks.values())
        pooled = self.model.forward_pre_logits(images, source=TaskPrompts(self, tasks, task_ids))
        width = max(task.head.out_features for task in tasks)
        out = pooled.new_full((images.shape[0], width), float("-inf"))
        for t, task in enumerate(tasks):
            logits = nn.functional.pad(task.head(pooled), (0, width - task.head.out_features), value=float("-inf"))
            out = torch.where((task_ids == t)[:, None], logits, out)
        return out

    def train(self, mode: bool = True) -> "PromptBank":
        super().train(mode)
        self.model.train(mode)
        return self

    def _apply(self, fn, recurse: bool = True):
        self.model._apply(fn, recurse)
        return super()._apply(fn, recurse)


def _field_hint(entry: str, target: Tensor, got: Tensor) -> str:
    if not entry.startswith("prompts"):
        return f"{entry} (project={target.shape[1] if target.dim() == 2 else None})"
    if got.dim() == 3 and got.shape[0] != target.shape[0]:
        return f"deep={target.shape[0] > 1} setting ({target.shape[0]} prompt sets)"
    if got.dim() == 3 and got.shape[1] != target.shape[1]:
        return "num_prompts"
    return "prompt dimension (embed dim or project)"
