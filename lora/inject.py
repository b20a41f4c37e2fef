"""Putting LoRA into a Qwen2: wrap linears by name, freeze the rest, merge, unmerge, take it out again.

Targets are the leaf names of Qwen2's linear layers (``q_proj`` ... ``down_proj``); every layer's
module of that name is wrapped, as PEFT's ``target_modules=["q_proj", "v_proj"]`` does. Our module
names are the checkpoint's minus its leading ``model.`` (``layers.0.self_attn.q_proj``).

The optional lm_head bias (the coursework setup trains one next to LoRA) is a zero-initialised fp32
vector added to the logits. Qwen2's lm_head has no bias and, in the small models, shares its weight
with the embedding; ``BiasedLMHead`` keeps that very Parameter, so the tie survives and nothing but
the bias is trained.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora.layer import LoRALinear

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class BiasedLMHead(nn.Linear):
    """lm_head with a trainable bias: logits = x @ W^T (in W's dtype) + bias (fp32), rounded once.

    As in ``LoRALinear``, the trained vector lives in fp32 and the sum is taken in fp32, so small
    bias updates are not lost to bf16 rounding of the parameter; the logits come out in W's dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        return (y.to(self.bias.dtype) + self.bias).to(y.dtype)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model by module name (``layers.0.self_attn.q_proj`` -> layer)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lm_head_bias(model: nn.Module) -> nn.Parameter | None:
    """The trainable lm_head bias added by ``apply_lora(train_lm_head_bias=True)``, or None."""
    head = getattr(model, "lm_head", None)
    return head.bias if isinstance(head, BiasedLMHead) else None


def _check_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [t for t in targets if t not in LINEAR_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {', '.join(map(repr, unknown))}: "
                         f"Qwen2's linear layers are {', '.join(LINEAR_TARGETS)}")
    return tuple(dict.fromkeys(targets))  # de-duplicated, order kept


def apply_lora(model: nn.Module, rank: int = 4, alpha: float | None = None,
               targets: str | Iterable[str] = ("q_proj", "v_proj"), dropout: float = 0.0,
               train_lm_head_bias: bool = False) -> list[str]:
    """Wrap every linear named in ``targets`` in a LoRALinear, freeze all other parameters.

    alpha defaults to rank (scaling 1). rank 0 adds no adapters: every parameter is frozen and only
    the lm_head bias, if requested, is trained. Returns the wrapped module names.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"LoRA rank must be a non-negative integer (0 = no adapters), got {rank!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    targets = _check_targets(targets)
    if rank > 0 and not targets:
        raise ValueError(f"rank {rank} with no targets: name at least one of {', '.join(LINEAR_TARGETS)}, "
                         "or use rank 0 for no adapters")
    if lora_layers(model) or lm_head_bias(model) is not None:
        raise ValueError("LoRA is already applied to this model; call lora.remove_lora(model) first")
    if train_lm_head_bias and model.lm_head.bias is not None:
        raise ValueError("the model's lm_head already has a bias; Qwen2's has none")

    model.requires_grad_(False)
    wrapped: list[str] = []
    if rank > 0:
        for name, module in list(model.named_modules()):
            if name.rpartition(".")[2] in targets and isinstance(module, nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, LoRALinear(module, rank, alpha, dropout))
                wrapped.append(name)
        found = {n.rpartition(".")[2] for n in wrapped}
        if missing := [t for t in targets if t not in found]:
            raise ValueError(f"the model has no linear layer named {', '.join(missing)}")
    if train_lm_head_bias:
        _add_lm_head_bias(model)
    return wrapped


def _add_lm_head_bias(model: nn.Module) -> None:
    old = model.lm_head
    with torch.device("meta"):  # the weight is not reallocated: the new head takes the old Parameter
        head = BiasedLMHead(old.in_features, old.out_features, bias=False)
    head.weight = old.weight  # same Parameter object: a tied embedding stays tied
    head.bias = nn.Parameter(torch.zeros(old.out_features, dtype=torch.float32, device=old.weight.device))
    model.lm_head = head


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts: lora_A, lora_B, lm_head_bias, other (anything else left
    trainable, normally 0) and total. A tied weight counts once."""
    counts = {"lora_A": 0, "lora_B": 0, "lm_head_bias": 0, "other": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = ("lora_A" if ".lora_A." in name else "lora_B" if ".lora_B." in name
                     else "lm_head_bias" if name == "lm_head.bias" else "other")
            counts[group] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (W += scaling * B @ A); returns the merged names.

    The forward pass then skips the adapter path. Do not train while merged: the adapters would get
    no gradient. See ``LoRALinear`` for the rounding of merge/unmerge in bf16.
    """
    layers = lora_layers(model)
    for layer in layers.values():
        layer.merge()
    return list(layers)


def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo ``merge_lora`` (W -= scaling * B @ A); returns the unmerged names."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.unmerge()
    return list(layers)


def remove_lora(model: nn.Module, merge: bool = True) -> list[str]:
    """Put plain nn.Linear layers back in place of the LoRALinear wrappers; returns their names.

    merge=True (PEFT's merge_and_unload) keeps what the adapters learnt, folded into the weights;
    an lm_head bias is kept too, as it cannot be folded into a weight. merge=False (PEFT's unload)
    throws the adapters and the bias away and restores the base model. Every parameter is left frozen.
    """
    layers = lora_layers(model)
    for name, layer in layers.items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    if not merge and lm_head_bias(model) is not None:
        old = model.lm_head
        with torch.device("meta"):
            head = nn.Linear(old.in_features, old.out_features, bias=False)
        head.weight = old.weight
        model.lm_head = head
    model.requires_grad_(False)
    return list(layers)
