"""qwen_min's model against transformers' Qwen2ForCausalLM (the oracle) on the same checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import qwen_min
from qwen_min import ConfigError, KVCache, QwenConfig
from tests.conftest import hf_model, random_ids


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "tiny_untied_ckpt"])
def test_fp32_logits_match_transformers(ckpt, request):
    path = request.getfixturevalue(ckpt)
    ours, theirs = qwen_min.from_pretrained(path, dtype=torch.float32), hf_model(path)
    ids = random_ids((3, 40))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    print(f"{ckpt}: fp32 max |diff| = {diff:.3g}")
    assert diff <= 1e-4


@pytest.mark.slow
def test_qwen25_05b_config_logits_match_transformers(qwen05_ckpt):
    ours = qwen_min.from_pretrained(qwen05_ckpt, dtype=torch.float32)
    assert ours.config == QwenConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                     num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                     rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    ids = random_ids((2, 64))
    with torch.no_grad():
        a = ours(ids)
        del ours
        theirs = hf_model(qwen05_ckpt)
        b = theirs(ids).logits
    diff = (a - b).abs().max().item()
    print(f"Qwen2.5-0.5B config: fp32 max |diff| = {diff:.3g}")
    assert diff <= 1e-4


def test_bf16_logits_within_bf16_tolerance(tiny_ckpt):
    ours, theirs = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.bfloat16), hf_model(tiny_ckpt, torch.bfloat16)
    ref = hf_model(tiny_ckpt)  # fp32 truth
    ids = random_ids((2, 32))
    with torch.no_grad():
        a, b, truth = ours(ids).float(), theirs(ids).logits.float(), ref(ids).logits
    assert ours.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    # Both bf16 implementations sit at the same distance from the fp32 truth, and close to each other.
    ours_err, theirs_err = (a - truth).abs().max().item(), (b - truth).abs().max().item()
    assert ours_err <= 2 * theirs_err + 1e-3
    assert (a - b).abs().max().item() <= 0.05 * truth.abs().max().item()


def test_left_padded_batch_matches_transformers(tiny_ckpt, hf_tiny):
    ours = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)
    ids = random_ids((3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[0, :7] = 0
    mask[1, :1] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = hf_tiny(ids, attention_mask=mask).logits
        # and each padded row equals the same prompt run alone, unpadded
        alone = ours(ids[0:1, 7:])
    real = mask.bool()
    assert torch.isfinite(a).all()
    assert (a - b)[real].abs().max().item() <= 1e-4
    assert (a[0, 7:] - alone[0]).abs().max().item() <= 1e-4


def test_kv_cached_decoding_equals_full_recompute(tiny_untied_ckpt):
    model = qwen_min.from_pretrained(tiny_untied_ckpt, dtype=torch.float32)
    ids = random_ids((2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 30, dtype=torch.float32)
        parts = [model(ids[:, :12], cache=cache)]          # prefill 12
        parts.append(model(ids[:, 12:20], cache=cache))    # a chunk of 8 against the cache
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(20, 30)]  # then one by one
    assert cache.length == 30
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_cache_overflow_is_an_error(tiny_ckpt):
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)
    cache = KVCache(model.config, 1, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="KV cache holds 8 positions"):
        model(random_ids((1, 9)), cache=cache)


def _config_dict(**changes):
    d = {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0}
    d.update(changes)
    return d


def test_config_reads_both_rope_layouts():
    old = QwenConfig.from_dict(_config_dict(rope_theta=5e5))
    new = QwenConfig.from_dict(_config_dict(rope_theta=None, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 5e5}))
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.head_dim == 8


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "llama"}, "model_type"),
    ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "multiple"),
])
def test_config_refuses_what_it_does_not_implement(changes, message):
    with pytest.raises(ConfigError, match=message):
        QwenConfig.from_dict(_config_dict(**changes))


def test_config_missing_field_names_file_and_field(tmp_path):
    d = _config_dict()
    del d["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config\.json: missing required field\(s\) intermediate_size"):
        QwenConfig.from_json(tmp_path / "config.json")


def test_building_the_structure_on_meta_does_no_arithmetic():
    # meta-device arithmetic runs torch's Python kernels, which import torch._dynamo (about 2 s of every
    # process that loads a model or prices a run); a fresh process builds the 0.5B structure without it
    import subprocess
    import sys

    code = ("import sys, torch\nfrom qwen_min import Qwen2, QwenConfig\nfrom qwen_min.config import QWEN25_05B\n"
            "with torch.device('meta'):\n    m = Qwen2(QwenConfig(**QWEN25_05B))\n"
            "assert m.embed_tokens.weight.is_meta and m.rotary.inv_freq.is_meta\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    # on a real device the embedding is initialised as nn.Embedding is, from the same random stream
    torch.manual_seed(0)
    theirs = torch.nn.Embedding(7, 3).weight
    torch.manual_seed(0)
    ours = qwen_min.model.Embedding(7, 3).weight
    assert ours.std() > 0.1 and torch.equal(ours, theirs)
