"""Planning reads the model's config.json alone: from a folder, or from the Hub without the weights."""

from __future__ import annotations

import huggingface_hub

from experiments.lib import planning
from qwen_min import QwenConfig


def test_model_config_of_a_folder_needs_no_weights(tmp_path, tiny_ckpt):
    (tmp_path / "config.json").write_bytes((tiny_ckpt / "config.json").read_bytes())
    config = planning.model_config(tmp_path)
    assert config == QwenConfig.from_json(tiny_ckpt / "config.json")
    assert planning.meta_model(config).lm_head.weight.is_meta


def test_model_config_from_the_hub_fetches_config_json_only(monkeypatch, tiny_ckpt):
    fetched = []

    def hf_hub_download(repo_id, filename, *, revision=None):
        fetched.append((repo_id, filename, revision))
        return str(tiny_ckpt / filename)

    def snapshot_download(*args, **kwargs):
        raise AssertionError("planning downloaded a snapshot (the weights)")

    monkeypatch.setattr(planning, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    config = planning.model_config("Qwen/Qwen2.5-0.5B-Instruct", revision="abc123")
    assert fetched == [("Qwen/Qwen2.5-0.5B-Instruct", "config.json", "abc123")]
    assert config.hidden_size == 64

