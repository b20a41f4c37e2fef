"""GGUF files: our reader against gguf-py's dequantization and transformers' own GGUF loading.

Each storage type gets a tiny random Qwen2 written as a GGUF file with gguf-py's GGUFWriter: values
quantized by ``gguf.quants.quantize`` where gguf-py can, and random raw blocks with small f16 scales
for the k-quants it cannot quantize. The oracles are ``gguf.quants.dequantize`` (our block decoders
must agree bit for bit) and ``Qwen2ForCausalLM.from_pretrained(dir, gguf_file=name)`` (same
parameters, same logits). The model is 256 wide so that every row holds whole 256-value k-quant blocks,
and its vocabulary is a toy byte-level one (272 tokens) so each file is small and quick to parse;
the tokenizer is checked on Qwen2.5's real vocabulary separately, without a file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import qwen_min
from qwen_min import CheckpointError, ConfigError, QwenConfig, Tokenizer, convert
from qwen_min import gguf as qg
from qwen_min.ggml_blocks import FORMATS
from tests.conftest import maxdiff, random_ids

Q = gguf.GGMLQuantizationType
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]

# Where each k-quant block keeps its f16 super-block scales (ggml-common.h: block_q4_K is d, dmin,
# scales[12], qs[128]; block_q5_K is d, dmin, scales[12], qh[32], qs[128]; block_q6_K is ql[128],
# qh[64], scales[16], d), with a bound that keeps the weights below about 0.1.
K_SCALES = {"Q4_K": ((0, 2), 1e-4), "Q5_K": ((0, 2), 5e-5), "Q6_K": ((208,), 2e-5)}


# ---------------------------------------------------------------------------------------------
# Writing GGUF files


def toy_vocabulary() -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of a byte-level BPE with Qwen2's special tokens: 272 tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet())                      # the 256 byte symbols
    merges = ["h e", "he l", "hel l", "hell o", "Ġ hello", "Ġ Ġ", "ĠĠ ĠĠ"]
    tokens += [m.replace(" ", "") for m in merges]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for token, kind in [("<|endoftext|>", gguf.TokenType.CONTROL), ("<|im_start|>", gguf.TokenType.CONTROL),
                        ("<|im_end|>", gguf.TokenType.CONTROL), ("<tool_call>", gguf.TokenType.USER_DEFINED)]:
        tokens.append(token)
        types.append(kind)
    while len(tokens) < 272:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types], merges


def random_tensors(config: QwenConfig, seed: int, *, with_output: bool) -> dict[str, np.ndarray]:
    """GGUF name -> float32 values in torch order: norms near 1, small biases and matrices."""
    rng = np.random.default_rng(seed)
    names = qg.gguf_name_map(config)
    if with_output:
        names["output.weight"] = "lm_head.weight"
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in qwen_min.Qwen2(config).named_parameters(remove_duplicate=False)}
    out = {}
    for gguf_name, ours in names.items():
        shape = shapes[ours]
        base = 1.0 if ours.endswith("norm.weight") else 0.0
        out[gguf_name] = (base + rng.normal(0, 0.05, shape)).astype(np.float32)
    return out


def encode(values: np.ndarray, type_name: str, rng: np.random.Generator) -> tuple[np.ndarray, Q | None]:
    """The bytes GGUFWriter stores for ``values`` in ``type_name`` (and the raw type to declare)."""
    if type_name == "F32":
        return values, None
    if type_name == "F16":
        return values.astype(np.float16), None
    if type_name in K_SCALES:  # gguf-py cannot quantize these: random blocks, bounded scales
        offsets, bound = K_SCALES[type_name]
        elements, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
        rows, n_blocks = values.shape[0], values.shape[1] // elements
        raw = rng.integers(0, 256, (rows, n_blocks, size), dtype=np.uint8)
        for at in offsets:
            scale = rng.uniform(0, bound, (rows, n_blocks)).astype(np.float16)
            raw[:, :, at:at + 2] = scale.view(np.uint8).reshape(rows, n_blocks, 2)
        return raw.reshape(rows, -1), Q[type_name]
    return gguf.quants.quantize(values, Q[type_name]), Q[type_name]


def write_gguf(path: Path, tensors: dict[str, np.ndarray], types: dict[str, str], *, arch: str = "qwen2",
               seed: int = 0, raw: dict[str, tuple[np.ndarray, Q]] | None = None) -> Path:
    """A GGUF file of these tensors (1-D ones in F32, as llama.cpp writes them), the TINY-like
    hyper-parameters and the toy vocabulary. ``raw`` holds tensors given as ready-made bytes."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(SHAPE["num_hidden_layers"])
    w.add_context_length(4096)
    w.add_embedding_length(SHAPE["hidden_size"])
    w.add_feed_forward_length(SHAPE["intermediate_size"])
    w.add_head_count(SHAPE["num_attention_heads"])
    w.add_head_count_kv(SHAPE["num_key_value_heads"])
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    tokens, token_types, merges = toy_vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    for name, values in tensors.items():
        if raw and name in raw:
            data, qtype = raw[name]
        else:
            data, qtype = encode(values, types.get(name, "F32") if values.ndim == 2 else "F32", rng)
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_config(**overrides) -> QwenConfig:
    fields = dict(vocab_size=272, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  max_position_embeddings=4096, **SHAPE)
    return QwenConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One tied file per storage type (every matrix in that type), and an untied one that mixes
    types the way the stand-in's Q4_K_M file does (embeddings Q5_0, output Q8_0, some Q6_K/Q4_K)."""
    folder = tmp_path_factory.mktemp("gguf")
    config = tiny_config()
    out = {}
    for i, t in enumerate(TYPES):
        tensors = random_tensors(config, seed=i, with_output=False)
        out[t] = write_gguf(folder / f"tiny-{t}.gguf", tensors, {n: t for n in tensors}, seed=i)
    tensors = random_tensors(config, seed=99, with_output=True)
    mixed = {n: "Q5_0" for n in tensors} | {"output.weight": "Q8_0", "blk.0.attn_v.weight": "Q8_0",
                                            "blk.0.ffn_down.weight": "Q6_K", "blk.1.ffn_down.weight": "Q4_K"}
    out["mixed"] = write_gguf(folder / "tiny-mixed.gguf", tensors, mixed, seed=99)
    return out


def transformers_model(path: Path):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------
# Dequantization


def test_block_layouts_match_ggml_sizes():
    for name, fmt in FORMATS.items():
        assert (fmt.elements, fmt.layout.itemsize) == gguf.GGML_QUANT_SIZES[Q[name]], name


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_gguf_py_bit_for_bit(files, type_name):
    reader = gguf.GGUFReader(files[type_name])
    seen = 0
    for t in reader.tensors:
        if t.tensor_type.name != type_name or len(t.shape) != 2:  # (norms and biases are always F32)
            continue
        theirs = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
        ours = qg.dequantize(np.asarray(t.data).tobytes(), type_name)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), t.name
        assert np.isfinite(ours).all() and np.abs(ours).max() < 2
        seen += 1
    assert seen == 2 * 7 + 1  # seven matrices per layer and the embeddings


def test_hand_computed_blocks():
    """One block each of Q4_0 and Q8_0 decoded by hand from the format's definition."""
    d = np.float16(0.5).tobytes()
    q4 = d + bytes((hi << 4) | lo for lo, hi in zip(range(16), range(15, -1, -1), strict=True))
    assert qg.dequantize(q4, "Q4_0").tolist() == [0.5 * (v - 8) for v in [*range(16), *range(15, -1, -1)]]
    q8 = d + np.arange(-16, 16, dtype=np.int8).tobytes()
    assert qg.dequantize(q8, "Q8_0").tolist() == [0.5 * v for v in range(-16, 16)]


# ---------------------------------------------------------------------------------------------
# The model against transformers' GGUF loading


@pytest.mark.parametrize("type_name", [*TYPES, "mixed"])
def test_model_matches_transformers(files, type_name):
    path = files[type_name]
    ours = qwen_min.from_pretrained(path, dtype=torch.float32)
    theirs = transformers_model(path)
    assert ours.config.tie_word_embeddings == theirs.config.tie_word_embeddings == (type_name != "mixed")
    assert ours.config == tiny_config(tie_word_embeddings=type_name != "mixed")
    hf = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, hf["model." + name if name != "lm_head.weight" else name]), name
    ids = random_ids((2, 24), vocab=272)
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert b.abs().max().item() > 0.1 and maxdiff(a, b) <= 1e-4


def test_dtype_is_applied_after_float32_dequantization(files):
    fp32 = qwen_min.from_pretrained(files["mixed"], dtype=torch.float32)
    bf16 = qwen_min.from_pretrained(files["mixed"], dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(fp32.named_parameters(), bf16.named_parameters(), strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name


def test_tied_on_request_ignores_output_weight(files):
    model = qg.from_gguf(files["mixed"], dtype=torch.float32, tie_word_embeddings=True)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    untied = qwen_min.from_pretrained(files["mixed"], dtype=torch.float32)
    assert torch.equal(model.embed_tokens.weight, untied.embed_tokens.weight)
    assert not torch.equal(untied.lm_head.weight, untied.embed_tokens.weight)


def test_config_and_checkpoint_files(files):
    path = files["Q8_0"]
    assert qwen_min.load_config(path) == tiny_config()
    model = qwen_min.from_pretrained(path, dtype=torch.float32)
    assert model.checkpoint_files == (str(path.resolve()),) and model.name_or_path == str(path)


def test_scripts_take_a_gguf_model(tmp_path, lv_data_file):
    """train.py and evaluate.py with --model FILE.gguf; the adapter records the file's SHA-256 as its base."""
    from experiments import evaluate, train
    from tests.conftest import script_argv

    path = write_gguf(tmp_path / "tiny.gguf", random_tensors(tiny_config(), 3, with_output=False), {}, seed=3)
    common = ["--max-systems", 2, "--context-length", 128]
    train.main(script_argv(path, lv_data_file, tmp_path / "run", *common, "--batch-size", 2, "--max-steps", 2,
                           "--eval-every", 0, "--val-systems", 2))
    base = json.loads((tmp_path / "run" / "adapter" / "base_model.json").read_text())
    assert base["checkpoint_sha256"] == {"tiny.gguf": hashlib.sha256(path.read_bytes()).hexdigest()}
    scored = evaluate.main(script_argv(path, lv_data_file, tmp_path / "eval", "--split", "val", *common,
                                       "--adapter", tmp_path / "run" / "adapter"))
    assert scored["model"] == str(path) and scored["scored_tokens"] > 0 and np.isfinite(scored["loss"])


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_toy_file_tokenizer_matches_transformers(files):
    from transformers import AutoTokenizer

    path = files["Q8_0"]
    ours = qwen_min.load_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokens = toy_vocabulary()[0]
    assert (ours.eos_id, ours.pad_id) == (tokens.index("<|im_end|>"), tokens.index("<|endoftext|>"))
    assert ours.eos_ids == sorted([ours.eos_id, ours.pad_id])
    for text in ["hello  hello\n\nhe said 0.12,3.4;", "<|im_start|>user\nhello<|im_end|>\n<tool_call><|endoftext|>"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode(" hello") == [tokens.index("Ġhello")]


@pytest.fixture(scope="module")
def qwen25_metadata(tokenizer_dir) -> dict:
    """The tokenizer.ggml.* keys llama.cpp writes for Qwen2.5, built from Qwen's own tokenizer files:
    the 151,643 BPE tokens, Qwen2.5's 22 added tokens (CONTROL when special, else USER_DEFINED), and
    [PAD...] entries up to the model's 151,936 rows."""
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    added = [t for t in json.loads((tokenizer_dir / "tokenizer.json").read_text())["added_tokens"] if t["id"] < 151665]
    tokens = [f"[PAD{i}]" for i in range(151936)]
    types = [int(gguf.TokenType.UNUSED)] * 151936
    for token, i in vocab.items():
        tokens[i], types[i] = token, int(gguf.TokenType.NORMAL)
    for t in added:
        tokens[t["id"]] = t["content"]
        types[t["id"]] = int(gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED)
    merges = [m for m in (tokenizer_dir / "merges.txt").read_text().splitlines() if m and not m.startswith("#")]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 151643,
            "tokenizer.ggml.eos_token_id": 151645, "tokenizer.ggml.padding_token_id": 151643,
            "tokenizer.ggml.add_bos_token": False}


def test_qwen25_vocabulary_matches_qwens_tokenizer(qwen25_metadata, tokenizer_dir):
    ours = qg.gguf_tokenizer(qwen25_metadata, "qwen2.5")
    real = Tokenizer(tokenizer_dir)
    assert [ours.encode(str(d)) for d in range(10)] == [[15 + d] for d in range(10)]
    assert ours.encode(",;") == [11, 26]
    assert (ours.eos_id, ours.pad_id, ours.eos_ids) == (151645, 151643, [151643, 151645])
    assert (ours.im_start_id, ours.im_end_id) == (151644, 151645)
    llmtime = "0.512,1.204;0.498,1.311;10.07,0.5;"
    chat = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + llmtime
            + "<|im_end|>\n<|im_start|>assistant\n0.47,1.40;<|im_end|><|endoftext|>")
    for text in [llmtime, chat, "  two  spaces\n\n\ttab, Ünïcödé e\u0301 中文 <tool_call>{}</tool_call>"]:
        assert ours.encode(text) == real.encode(text)
        assert ours.decode(ours.encode(text)) == unicodedata.normalize("NFC", text)  # (Qwen normalizes to NFC)
    assert ours.encode(chat).count(151645) == 3 and ours.encode(chat)[-1] == 151643
    assert ours.decode(ours.encode(chat), skip_special_tokens=True) == real.decode(real.encode(chat),
                                                                                   skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# Refusals: one line each, naming the file and what is not read


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_another_architecture_is_refused(tmp_path):
    config = tiny_config()
    path = write_gguf(tmp_path / "llama.gguf", random_tensors(config, 0, with_output=False), {}, arch="llama")
    for load in (qwen_min.load_config, qwen_min.from_pretrained):
        with pytest.raises(ConfigError) as e:
            load(path)
        assert str(path) in one_line(e) and "'llama'" in str(e.value) and "qwen2" in str(e.value)


def test_an_unread_tensor_type_is_refused(tmp_path):
    config = tiny_config()
    tensors = random_tensors(config, 0, with_output=False)
    name = "blk.1.ffn_down.weight"
    rows, cols = tensors[name].shape
    elements, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    raw = np.zeros((rows, cols // elements * size), dtype=np.uint8)
    path = write_gguf(tmp_path / "iq4.gguf", tensors, {}, raw={name: (raw, Q.IQ4_NL)})
    with pytest.raises(CheckpointError) as e:
        qwen_min.from_pretrained(path)
    message = one_line(e)
    assert str(path) in message and name in message and "IQ4_NL" in message and "Q4_K" in message


def test_not_a_gguf_file_is_refused(tmp_path, files):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(files["F32"].read_bytes()[:-4096])
    for path, why in [(junk, "not a GGUF file"), (truncated, "truncated"), (tmp_path / "absent.gguf", "no such")]:
        with pytest.raises(CheckpointError) as e:
            qwen_min.from_pretrained(path)
        assert str(path) in one_line(e) and why in str(e.value)
    with pytest.raises(CheckpointError, match="no revision"):
        qwen_min.from_pretrained(files["F32"], revision="main")


def test_without_the_gguf_package(monkeypatch, files):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    qg._read_gguf.cache_clear()                      # (so the header is parsed again)
    with pytest.raises(CheckpointError, match=r"needs the gguf package: pip install 'qwen-lora-ts\[gguf\]'$"):
        qwen_min.load_tokenizer(files["Q8_0"])


# ---------------------------------------------------------------------------------------------
# Converter


def test_converter_writes_a_hub_folder(tmp_path, files):
    path, out = files["mixed"], tmp_path / "hub"
    assert convert.main([str(path), "--out", str(out), "--dtype", "fp32"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    direct = qwen_min.from_pretrained(path, dtype=torch.float32)
    via_folder = qwen_min.from_pretrained(out, dtype=torch.float32)
    for (name, a), (_, b) in zip(direct.named_parameters(), via_folder.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    theirs = transformers_model(path)
    from transformers import Qwen2ForCausalLM

    folder_hf = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids((1, 16), vocab=272)
    with torch.no_grad():
        assert maxdiff(folder_hf(ids).logits, theirs(ids).logits) == 0
    tok, gguf_tok = Tokenizer(out), qwen_min.load_tokenizer(path)
    text = "<|im_start|>user\nhello 0.5,1.25;<|im_end|>"
    assert tok.encode(text) == gguf_tok.encode(text)
    assert (tok.eos_id, tok.pad_id, tok.eos_ids) == (gguf_tok.eos_id, gguf_tok.pad_id, gguf_tok.eos_ids)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"].startswith("{% for m in")


def test_converter_never_overwrites(tmp_path, files, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert.main([str(files["Q8_0"]), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "not an empty folder" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    shutil.rmtree(out)
