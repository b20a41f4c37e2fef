"""The checkpoint's own tokenizer (``tokenizer.json``, or a GGUF file's metadata), with its special
tokens read from its files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from qwen_min.config import CheckpointError


class Tokenizer:
    """Byte-level BPE tokenizer: ``encode(text) -> ids`` and ``decode(ids) -> text``.

    Special token ids come from the checkpoint: eos from tokenizer_config.json's ``eos_token``
    (falling back to generation_config.json's first ``eos_token_id``), pad from ``pad_token``
    (falling back to generation_config.json's ``pad_token_id``); ``eos_ids`` holds every id
    generation should stop at (generation_config.json may list several). Both tokenizer.json and
    tokenizer_config.json must exist, and a special token the files name must be in the vocabulary:
    guessing either (e.g. padding with eos) would silently change what the model is trained on.
    From a GGUF file the ids are its ``tokenizer.ggml.*_token_id`` keys (see ``qwen_min.gguf``).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (directory / name).is_file():
                raise CheckpointError(f"{directory}: no {name} (a checkpoint's tokenizer needs both "
                                      f"tokenizer.json and tokenizer_config.json)")
        self._tok = _HFTokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config = _read_json(config_path)
        generation_path = directory / "generation_config.json"
        generation = _read_json(generation_path) if generation_path.is_file() else {}

        eos_id = self._special_id(config, "eos_token", config_path)
        pad_id = self._special_id(config, "pad_token", config_path)
        gen_eos = generation.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if eos_id is None and gen_eos:
            eos_id = gen_eos[0]
        if pad_id is None:
            pad_id = generation.get("pad_token_id")
        if not isinstance(pad_id, int):
            raise CheckpointError(
                f"{config_path}: no pad token: field 'pad_token' is missing or null, and "
                f"{generation_path} has no integer 'pad_token_id' (found {pad_id!r})")
        self._set_ids(eos_id, pad_id, sorted({i for i in [eos_id, *gen_eos] if i is not None}))

    @classmethod
    def from_tokenizer(cls, tok: _HFTokenizer, *, eos_id: int, pad_id: int, eos_ids: list[int]) -> Tokenizer:
        """A tokenizer built elsewhere (``qwen_min.gguf`` builds one from a GGUF file's metadata)."""
        self = cls.__new__(cls)
        self._tok = tok
        self._set_ids(eos_id, pad_id, eos_ids)
        return self

    def _set_ids(self, eos_id: int | None, pad_id: int, eos_ids: list[int]) -> None:
        self.im_start_id = self._tok.token_to_id("<|im_start|>")
        self.im_end_id = self._tok.token_to_id("<|im_end|>")
        self.eos_id, self.pad_id, self.eos_ids = eos_id, pad_id, eos_ids

    def _special_id(self, config: dict, field: str, path: Path) -> int | None:
        """The id of the token ``config[field]`` names; None when the field is absent or null."""
        token = config.get(field)
        if isinstance(token, dict):  # older files store {"content": "<|endoftext|>", ...}
            token = token.get("content")
        if token is None:
            return None
        token_id = self._tok.token_to_id(token) if isinstance(token, str) else None
        if token_id is None:
            raise CheckpointError(f"{path}: field {field!r} names {token!r}, which is not a token of the "
                                  f"vocabulary in {path.parent / 'tokenizer.json'}")
        return token_id

    @property
    def backend(self) -> _HFTokenizer:
        """The ``tokenizers`` object behind this one (to save it as tokenizer.json, say)."""
        return self._tok

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
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d
