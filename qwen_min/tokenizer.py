"""The checkpoint's own tokenizer (``tokenizer.json``), with its special tokens read from its files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from qwen_min.load import CheckpointError, resolve


class Tokenizer:
    """Byte-level BPE tokenizer: ``encode(text) -> ids`` and ``decode(ids) -> text``.

    Special token ids come from the checkpoint: eos from tokenizer_config.json's ``eos_token``
    (falling back to generation_config.json's first ``eos_token_id``), pad from ``pad_token``;
    ``eos_ids`` holds every id generation should stop at (generation_config.json may list several).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{directory}: no tokenizer.json")
        self._tok = _HFTokenizer.from_file(str(path))
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")

        self.im_start_id = self._tok.token_to_id("<|im_start|>")
        self.im_end_id = self._tok.token_to_id("<|im_end|>")
        self.eos_id = self._special_id(config.get("eos_token"))
        self.pad_id = self._special_id(config.get("pad_token"))
        gen_eos = generation.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if self.eos_id is None and gen_eos:
            self.eos_id = gen_eos[0]
        self.eos_ids = sorted({i for i in [self.eos_id, *gen_eos] if i is not None})
        if self.pad_id is None:
            self.pad_id = generation.get("pad_token_id", self.eos_id)

    def _special_id(self, token: str | dict | None) -> int | None:
        if isinstance(token, dict):  # older files store {"content": "<|endoftext|>", ...}
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added (Qwen has no BOS)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def load_tokenizer(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Tokenizer:
    """The tokenizer of a Hub repo id or local checkpoint folder."""
    return Tokenizer(resolve(name_or_path, revision=revision))
