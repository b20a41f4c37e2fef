"""qwen_min: a small, explicit Qwen2 / Qwen2.5 in PyTorch.

Public API: ``QwenConfig``, ``Qwen2``, ``KVCache``, ``from_pretrained``, ``save_pretrained``,
``load_config``, ``load_tokenizer``, ``generate``, ``chunked_cross_entropy``, ``init_weights``
(random Qwen2 weights) and ``QWEN25_05B`` (the 0.5B model's config.json figures).

``from_pretrained``, ``load_config`` and ``load_tokenizer`` take a Hub repo id, a local checkpoint
folder or a GGUF file of a Qwen2 model (``qwen_min.gguf``; needs ``pip install 'qwen-lora-ts[gguf]'``).
"""

from qwen_min.config import QWEN25_05B, ConfigError, QwenConfig
from qwen_min.generate import Generation, generate
from qwen_min.load import CheckpointError, from_pretrained, load_config, load_tokenizer, save_pretrained
from qwen_min.loss import chunked_cross_entropy
from qwen_min.model import KVCache, Qwen2, init_weights
from qwen_min.tokenizer import Tokenizer

__all__ = [
    "QWEN25_05B", "CheckpointError", "ConfigError", "Generation", "KVCache", "Qwen2", "QwenConfig", "Tokenizer",
    "chunked_cross_entropy", "from_pretrained", "generate", "init_weights", "load_config", "load_tokenizer",
    "save_pretrained",
]
