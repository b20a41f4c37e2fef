"""Checkpoint loading: sharded files, the Hub cache path offline, and every kind of bad checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen_min
from qwen_min import CheckpointError
from tests.conftest import build_checkpoint

REPO = "Qwen/Qwen2.5-0.5B-Instruct"
COMMIT = "7ae557604adf67be50417f59c2c2f167def9a775"


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sharded_checkpoint_loads_identically(tmp_path, tiny_ckpt):
    sharded = build_checkpoint(tmp_path / "sharded", max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) >= 2
    assert _same_weights(qwen_min.from_pretrained(sharded, dtype=torch.float32),
                         qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32))


def test_dtype_conversion_on_load(tiny_ckpt):
    ref = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)
    bf = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert torch.equal(bf.layers[1].mlp.up_proj.weight, ref.layers[1].mlp.up_proj.weight.bfloat16())


def _populate_hub_cache(hf_home: Path, source: Path) -> None:
    """The layout huggingface_hub writes: blobs, refs/main -> commit, snapshots/<commit>/<files>."""
    repo = hf_home / "hub" / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in source.iterdir():
        blob = repo / "blobs" / f"{f.name}.blob"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)


def test_repo_id_resolves_from_local_cache_offline(tmp_path, tiny_ckpt):
    _populate_hub_cache(tmp_path / "hf", tiny_ckpt)
    code = (
        "import torch, qwen_min\n"
        f"m = qwen_min.from_pretrained('{REPO}', dtype=torch.float32)\n"
        f"p = qwen_min.from_pretrained('{REPO}', revision='{COMMIT}', dtype=torch.float32)\n"
        f"t = qwen_min.load_tokenizer('{REPO}')\n"
        f"ref = qwen_min.from_pretrained('{tiny_ckpt}', dtype=torch.float32)\n"
        "ids = torch.tensor([t.encode('0.25,1.50;0.27,1.47;')])\n"
        "assert torch.equal(m(ids), ref(ids)) and torch.equal(p(ids), ref(ids))\n"
        "print('OK', t.eos_id)\n"
    )
    r = _run(code, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["OK", "151645"]


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}])
def test_no_cache_no_network_tells_the_user_what_to_do(tmp_path, env):
    r = _run(f"import qwen_min; qwen_min.from_pretrained('{REPO}')", HF_HOME=str(tmp_path / "empty"), **env)
    assert r.returncode != 0
    assert "CheckpointError" in r.stderr
    assert "not in the local Hub cache" in r.stderr and f"hf download {REPO}" in r.stderr
    assert "local checkpoint folder" in r.stderr


def test_not_a_folder_nor_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        qwen_min.from_pretrained(str(tmp_path / "nowhere" / "deep" / "path"))


@pytest.fixture
def broken(tmp_path, tiny_ckpt) -> Path:
    d = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, d)
    return d


def test_config_missing_field(broken):
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(qwen_min.ConfigError, match="missing required field.*num_hidden_layers"):
        qwen_min.from_pretrained(broken)


def test_missing_tensor_is_named(broken):
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.self_attn\.k_proj\.bias"):
        qwen_min.from_pretrained(broken)


def test_unexpected_tensor_is_named(broken):
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) model\.layers\.7\.mlp\.up_proj\.weight"):
        qwen_min.from_pretrained(broken)


def test_wrong_shape_names_tensor_and_both_shapes(broken):
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight has shape \(64, 100\), "
                                              r"the config\.json implies \(64, 128\)"):
        qwen_min.from_pretrained(broken)


def test_config_that_does_not_match_tensors(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight has shape \(128, 64\).*implies \(256, 64\)"):
        qwen_min.from_pretrained(broken)


@pytest.mark.parametrize("keep", [4, 1000, -100])
def test_truncated_safetensors(broken, keep):
    f = broken / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        qwen_min.from_pretrained(broken)


def test_corrupt_safetensors_header(broken):
    f = broken / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:10] = b"[["  # the JSON header no longer parses
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        qwen_min.from_pretrained(broken)


def test_missing_shard_and_missing_weights(tmp_path, broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        qwen_min.from_pretrained(broken)
    sharded = build_checkpoint(tmp_path / "sharded", max_shard_size="2MB")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shard.* that do not exist"):
        qwen_min.from_pretrained(sharded)


def test_save_pretrained_round_trips_through_transformers(tmp_path, tiny_untied_ckpt):
    from transformers import Qwen2ForCausalLM

    model = qwen_min.from_pretrained(tiny_untied_ckpt, dtype=torch.float32)
    out = qwen_min.save_pretrained(model, tmp_path / "saved")
    again = qwen_min.from_pretrained(out, dtype=torch.float32)
    theirs = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 151936, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
        assert (theirs(ids).logits - model(ids)).abs().max().item() <= 1e-4
