"""lora: explicit LoRA for qwen_min's Qwen2, interchangeable with PEFT.

``LoRALinear`` is the maths (layer.py); ``apply_lora`` wraps Qwen2's linears by name and freezes
the rest, ``merge_lora`` / ``unmerge_lora`` / ``remove_lora`` fold the update in and out
(inject.py); ``save_adapter`` / ``load_adapter`` read and write PEFT's on-disk layout and
``export_merged`` a plain Hub checkpoint (adapter.py); an adapter folder is saved whole or not at
all, and ``interrupted_save`` says why one is missing after a crash (swap.py); ``base_fingerprint`` is
what an adapter records of its base model, and ``load_adapter`` refuses another base
(``allow_other_base=True`` to load anyway).

    model = qwen_min.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct", dtype=torch.bfloat16)
    lora.apply_lora(model, rank=4, targets=("q_proj", "v_proj"))   # only A and B are trainable
    ...train...
    lora.save_adapter(model, "run/adapter")                        # PeftModel.from_pretrained reads it
"""

from lora.adapter import AdapterError, base_fingerprint, export_merged, load_adapter, save_adapter
from lora.inject import (
    LINEAR_TARGETS,
    BiasedLMHead,
    apply_lora,
    lm_head_bias,
    lora_layers,
    merge_lora,
    remove_lora,
    trainable_parameters,
    unmerge_lora,
)
from lora.layer import LoRALinear
from lora.swap import interrupted_save

__all__ = [
    "LINEAR_TARGETS", "AdapterError", "BiasedLMHead", "LoRALinear", "apply_lora", "base_fingerprint", "export_merged",
    "interrupted_save", "lm_head_bias",
    "load_adapter", "lora_layers", "merge_lora", "remove_lora", "save_adapter", "trainable_parameters",
    "unmerge_lora",
]
