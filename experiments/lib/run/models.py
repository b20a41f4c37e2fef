"""The model a script runs: the base weights in the dtype its --dtype and device call for, its
tokenizer, and a saved adapter loaded into it (refused, or with --allow-other-base a warning, when it
was trained on another base model).
"""

from __future__ import annotations

import torch

import lora
import qwen_min
from experiments.lib.run import devices
from experiments.lib.run.config import AdapterConfig, RunConfig
from experiments.lib.run.rundata import RunData, warn
from qwen_min import Qwen2, Tokenizer


def load_model(cfg: RunConfig, device: torch.device) -> tuple[Qwen2, Tokenizer]:
    """The base model, in ``devices.weight_dtype(cfg.dtype, device)``, and its tokenizer."""
    model = qwen_min.from_pretrained(cfg.model, revision=cfg.revision, dtype=devices.weight_dtype(cfg.dtype, device),
                                     device=device)
    return model, qwen_min.load_tokenizer(cfg.model, revision=cfg.revision)


def load_adapter(model: Qwen2, cfg: AdapterConfig, run_data: RunData | None = None) -> None:
    """lora.load_adapter with --allow-other-base; its warning goes to ``run_data.warnings`` (None: the
    meta-device shape planned first, whose notes the real load records again). A refusal is lora.AdapterError,
    prefixed with the flag."""
    notes: list[str] = []
    try:
        lora.load_adapter(model, cfg.adapter, allow_other_base=cfg.allow_other_base, warn=notes)
    except lora.AdapterError as e:
        raise lora.AdapterError(f"--adapter: {e}") from None
    for note in notes if run_data else []:
        warn(run_data.warnings, note)
