"""Model hyper-parameters, read from a Hugging Face ``config.json``.

Only the settings this implementation really supports are accepted. Anything that would change the
maths (a sliding window switched on, rope scaling, another architecture) is refused with an error
that names the file and the field, rather than silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Qwen2.5-0.5B(-Instruct)'s config.json, the figures that shape the model: the benchmark's and the
# device check's random checkpoints, and the tests' full-size architecture.
QWEN25_05B: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, max_position_embeddings=32768,
)


class ConfigError(ValueError):
    """A config.json that is malformed or asks for something this implementation does not do."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, parsed or matched against the model."""


@dataclass(frozen=True)
class QwenConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    head_dim: int | None = None  # None: hidden_size // num_attention_heads

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> QwenConfig:
        """Build from the parsed config.json; ``source`` names the file in error messages."""
        model_type = d.get("model_type")
        if model_type != "qwen2":
            raise ConfigError(f"{source}: model_type is {model_type!r}; only 'qwen2' is supported")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported (full attention only)")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (silu only)")
        if d.get("attention_bias") is False:
            raise ConfigError(f"{source}: attention_bias=false is not supported (Qwen2 has q/k/v biases)")
        if d.get("rope_scaling"):
            raise ConfigError(f"{source}: rope_scaling {d['rope_scaling']!r} is not supported")
        # transformers >= 5 writes rope settings as `rope_parameters`; older files use `rope_theta`.
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: rope_parameters.rope_type {rope['rope_type']!r} is not supported")
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))

        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
                rope_theta=float(rope_theta),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
                head_dim=d.get("head_dim"),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> QwenConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A config.json that transformers and this package both read back."""
        d = asdict(self)
        d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                 use_sliding_window=False, rope_scaling=None)
        return d
