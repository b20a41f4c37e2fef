"""lora/adapter.py: adapters on disk in PEFT's layout (ours loaded by PEFT, PEFT's loaded here), the
lm_head bias file, merged export, and every kind of adapter that does not fit the model."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal

import pytest
import torch
from safetensors import safe_open

import lora
import qwen_min
from lora import swap
from lora.swap import REPLACED, SAVING, leftovers
from qwen_min import Qwen2
from tests.conftest import (
    PEFT_TOL,
    copy_lora_into_peft,
    hf_model,
    maxdiff,
    ours_from,
    peft_lora,
    random_ids,
    randomize_lora,
)


def _attach_bias_like_a_peft_user(peft_model, folder) -> None:
    """The snippet from lora/adapter.py's docstring, verbatim."""
    from safetensors.torch import load_file

    model = peft_model
    bias = load_file(f"{folder}/lm_head_bias.safetensors")["lm_head.bias"]
    model.get_output_embeddings().bias = torch.nn.Parameter(bias.to(model.dtype), requires_grad=False)


def test_saved_adapter_loads_in_peft_and_matches_peft_own_format(tiny_ckpt, tmp_path):
    from peft import PeftModel

    ours = ours_from(tiny_ckpt)
    lora.apply_lora(ours, rank=4, alpha=8)
    randomize_lora(ours)
    lora.save_adapter(ours, tmp_path / "ours", base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    theirs = PeftModel.from_pretrained(hf_model(tiny_ckpt), tmp_path / "ours").eval()
    ids = random_ids()
    with torch.no_grad():
        diff = maxdiff(ours(ids), theirs(input_ids=ids).logits)
    print(f"our adapter in PeftModel.from_pretrained: logits max |diff| = {diff:.3g}")
    assert diff <= PEFT_TOL

    # PEFT saving the very same adapter writes the same tensors under the same keys, and the same config.
    theirs.save_pretrained(tmp_path / "peft")
    files = {}
    for who in ("ours", "peft"):
        with safe_open(str(tmp_path / who / "adapter_model.safetensors"), "pt") as f:
            files[who] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert files["ours"].keys() == files["peft"].keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in files["ours"]
    for k, t in files["ours"].items():
        assert t.dtype == files["peft"][k].dtype and torch.equal(t, files["peft"][k]), k
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert mine["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    for key, value in mine.items():
        if key == "target_modules":
            assert sorted(value) == sorted(peft_cfg[key])
        elif key != "base_model_name_or_path":
            assert value == peft_cfg[key], key
    assert {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type",
            "fan_in_fan_out"} <= mine.keys()


def test_peft_adapter_loads_here(tiny_untied_ckpt, tmp_path):
    targets = ("q_proj", "k_proj", "o_proj", "down_proj")
    theirs = peft_lora(hf_model(tiny_untied_ckpt), 6, 16, targets)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=g)
    theirs.save_pretrained(tmp_path / "peft")
    ids = random_ids()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits

    ours = ours_from(tiny_untied_ckpt)
    names = lora.load_adapter(ours, tmp_path / "peft")
    assert len(names) == ours.config.num_hidden_layers * len(targets)
    layer = lora.lora_layers(ours)["layers.1.self_attn.k_proj"]
    assert (layer.rank, layer.alpha, layer.scaling) == (6, 16.0, 16 / 6)
    with torch.no_grad():
        diff = maxdiff(ours(ids), want)
    print(f"PEFT adapter loaded here: logits max |diff| = {diff:.3g}")
    assert diff <= PEFT_TOL
    counts = lora.trainable_parameters(ours)
    assert counts["total"] == counts["lora_A"] + counts["lora_B"] == theirs.get_nb_trainable_parameters()[0]

    # A regex target_modules string (PEFT's other form) selects the same layers.
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = r"model\.layers\.\d+\.(self_attn\.(q|k|o)_proj|mlp\.down_proj)"
    cfg_path.write_text(json.dumps(cfg))
    again = ours_from(tiny_untied_ckpt)
    assert lora.load_adapter(again, tmp_path / "peft") == names
    # Loading into a model whose LoRA already matches just overwrites the values.
    lora.load_adapter(again, tmp_path / "peft")
    with torch.no_grad():
        assert maxdiff(again(ids), want) <= PEFT_TOL


def test_lm_head_bias_saved_alongside_and_reproduced_by_peft_user(tiny_ckpt, tmp_path):
    from peft import PeftModel

    ours = ours_from(tiny_ckpt)
    lora.apply_lora(ours, rank=2, train_lm_head_bias=True)
    assert ours.lm_head.weight is ours.embed_tokens.weight  # still tied
    randomize_lora(ours)
    folder = tmp_path / "adapter"
    lora.save_adapter(ours, folder)
    with safe_open(str(folder / "lm_head_bias.safetensors"), "pt") as f:
        assert list(f.keys()) == ["lm_head.bias"] and f.get_tensor("lm_head.bias").dtype == torch.float32

    peft_model = PeftModel.from_pretrained(hf_model(tiny_ckpt), folder).eval()
    _attach_bias_like_a_peft_user(peft_model, folder)
    ids = random_ids()
    with torch.no_grad():
        a = ours(ids)
        diff = maxdiff(a, peft_model(input_ids=ids).logits)
    print(f"LoRA + lm_head bias vs PEFT + attached bias: logits max |diff| = {diff:.3g}")
    assert diff <= PEFT_TOL

    back = ours_from(tiny_ckpt)
    lora.load_adapter(back, folder)
    assert back.lm_head.weight is back.embed_tokens.weight
    assert lora.trainable_parameters(back)["lm_head_bias"] == 151936
    with torch.no_grad():
        assert torch.equal(back(ids), a)

    # A new save without the bias removes the stale bias file.
    plain = ours_from(tiny_ckpt)
    lora.apply_lora(plain, rank=2)
    lora.save_adapter(plain, folder)
    assert not (folder / "lm_head_bias.safetensors").exists()


def test_bias_only_adapter_round_trip(tiny_ckpt, tmp_path):
    """rank 0 with the lm_head bias: saved as r=0 with only the bias file, loaded back to the same logits."""
    ours = ours_from(tiny_ckpt)
    lora.apply_lora(ours, rank=0, train_lm_head_bias=True)
    randomize_lora(ours)
    lora.save_adapter(ours, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 0
    back = ours_from(tiny_ckpt)
    assert lora.load_adapter(back, tmp_path / "a") == []
    assert torch.equal(lora.lm_head_bias(back), lora.lm_head_bias(ours))
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "tiny_untied_ckpt"])
def test_export_merged_loads_in_qwen_min_and_transformers(ckpt, request, tmp_path):
    path = request.getfixturevalue(ckpt)
    ours = ours_from(path)
    lora.apply_lora(ours, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    randomize_lora(ours)
    state = {n: t.clone() for n, t in ours.state_dict().items()}
    layers = lora.lora_layers(ours)
    ids = random_ids()
    with torch.no_grad():
        want = ours(ids)

    lora.export_merged(ours, tmp_path / "merged")

    # The caller's model is untouched: same modules, same values, not merged.
    assert lora.lora_layers(ours) == layers and not any(m.merged for m in layers.values())
    assert all(torch.equal(t, state[n]) for n, t in ours.state_dict().items())
    # PEFT's merged model on the same adapters is the oracle for the exported weights.
    theirs = peft_lora(hf_model(path), 4, 8, ("q_proj", "v_proj", "down_proj"))
    copy_lora_into_peft(ours, theirs)
    with torch.no_grad():
        peft_logits = theirs.merge_and_unload()(input_ids=ids).logits
        d_ours = maxdiff(ours_from(tmp_path / "merged")(ids), want)
        d_hf = maxdiff(hf_model(tmp_path / "merged")(input_ids=ids).logits, peft_logits)
    print(f"{ckpt} merged export: qwen_min vs unmerged LoRA {d_ours:.3g}, transformers vs PEFT merged {d_hf:.3g}")
    assert d_ours <= PEFT_TOL and d_hf <= PEFT_TOL


def test_load_adapter_on_meta_model_applies_structure(tiny_ckpt, tmp_path):
    ours = ours_from(tiny_ckpt)
    lora.apply_lora(ours, rank=4, train_lm_head_bias=True)
    lora.save_adapter(ours, tmp_path / "a")
    with torch.device("meta"):
        shape = Qwen2(ours.config)
    lora.load_adapter(shape, tmp_path / "a")
    assert lora.trainable_parameters(shape) == lora.trainable_parameters(ours)


@pytest.fixture
def saved_adapter(tiny_ckpt, tmp_path):
    """An adapter with rank 4, alpha 8, q and v, saved from the tiny model."""
    model = ours_from(tiny_ckpt)
    lora.apply_lora(model, rank=4, alpha=8)
    randomize_lora(model)
    return lora.save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize(("kw", "message"), [
    (dict(rank=8, alpha=8), "rank 8 vs r=4"),
    (dict(rank=4, alpha=8, targets=("q_proj", "k_proj")), r"targets \['k_proj', 'q_proj'\] vs \['q_proj', 'v_proj'\]"),
    (dict(rank=4, alpha=4), "alpha 4 vs lora_alpha=8"),
    (dict(rank=4, alpha=8, train_lm_head_bias=True), "lm_head bias present vs absent"),
])
def test_load_adapter_into_mismatched_lora(tiny_ckpt, saved_adapter, kw, message):
    model = ours_from(tiny_ckpt)
    lora.apply_lora(model, **kw)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(lora.AdapterError, match=f"does not match the adapter.*{message}"):
        lora.load_adapter(model, saved_adapter)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_load_adapter_shape_mismatch_leaves_model_untouched(tiny_untied_ckpt, saved_adapter):
    model = ours_from(tiny_untied_ckpt)  # hidden 128, the adapter was made for hidden 64
    with pytest.raises(lora.AdapterError, match=r"q_proj.lora_A.weight has shape \(4, 64\); the model's "
                                                r"layers.0.self_attn.q_proj \(128 -> 256\) with r=4 needs \(4, 128\)"):
        lora.load_adapter(model, saved_adapter)
    assert not lora.lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(("changes", "message"), [
    (dict(use_dora=True), "use_dora=True is not supported"),
    (dict(use_rslora=True), "use_rslora=True is not supported"),
    (dict(bias="all"), "bias='all' is not supported"),
    (dict(layers_to_transform=[0]), r"layers_to_transform=\[0\] is not supported"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save=.*is not supported"),
    (dict(peft_type="IA3"), "peft_type is 'IA3'; only 'LORA'"),
    (dict(r=8), r"lora_A.weight has shape \(4, 64\).*with r=8 needs \(8, 64\)"),
    (dict(target_modules=["q_proj", "v_proj", "k_proj"]), "missing tensor.*k_proj.lora_A.weight"),
    (dict(target_modules=["q_proj"]), "v_proj.lora_A.weight.*match no LoRA layer"),
    (dict(target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj"), "in some layers only"),
])
def test_load_adapter_bad_config(tiny_ckpt, saved_adapter, changes, message):
    _edit_config(saved_adapter, **changes)
    model = ours_from(tiny_ckpt)
    with pytest.raises(lora.AdapterError, match=message):
        lora.load_adapter(model, saved_adapter)
    assert not lora.lora_layers(model)


def test_adapter_errors_misc(tiny_ckpt, saved_adapter, tmp_path):
    model = ours_from(tiny_ckpt)
    with pytest.raises(lora.AdapterError, match="adapter_config.json: no such file"):
        lora.load_adapter(model, tmp_path / "nowhere")
    with pytest.raises(lora.AdapterError, match="nothing to save"):
        lora.save_adapter(model, tmp_path / "empty")
    lora.apply_lora(model, rank=4, alpha=8)
    lora.merge_lora(model)
    with pytest.raises(lora.AdapterError, match="merged.*unmerge_lora"):
        lora.load_adapter(model, saved_adapter)
    biased = ours_from(tiny_ckpt)
    lora.apply_lora(biased, rank=2, train_lm_head_bias=True)
    with pytest.raises(lora.AdapterError, match="cannot export a merged Qwen2 checkpoint with a trained lm_head bias"):
        lora.export_merged(biased, tmp_path / "merged")
    with pytest.raises(qwen_min.CheckpointError, match="no Qwen2 checkpoint name"):
        qwen_min.save_pretrained(biased, tmp_path / "raw")


@pytest.mark.slow
def test_qwen25_05b_adapter_roundtrip_with_peft(qwen05_ckpt, tmp_path):
    from peft import PeftModel

    ours = ours_from(qwen05_ckpt)
    lora.apply_lora(ours, rank=8)
    assert lora.trainable_parameters(ours)["total"] == 540_672
    randomize_lora(ours)
    lora.save_adapter(ours, tmp_path / "a")
    ids = random_ids((1, 32))
    with torch.no_grad():
        a = ours(ids)
    del ours
    theirs = PeftModel.from_pretrained(hf_model(qwen05_ckpt), tmp_path / "a").eval()
    with torch.no_grad():
        diff = maxdiff(a, theirs(input_ids=ids).logits)
    print(f"Qwen2.5-0.5B config, rank 8: logits max |diff| vs PEFT = {diff:.3g}")
    assert diff <= PEFT_TOL


# ---- what load_adapter checks in the files: finite values, parseable files, the base model


def test_non_finite_adapter_weights_refused(tiny_ckpt, saved_adapter):
    from safetensors.torch import load_file, save_file

    path = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    model = ours_from(tiny_ckpt)
    with pytest.raises(lora.AdapterError, match=f"adapter_model.safetensors: tensor {key} has 1 non-finite"):
        lora.load_adapter(model, saved_adapter)
    assert not lora.lora_layers(model)


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_damaged_adapter_file_refused_naming_it(tiny_ckpt, saved_adapter, damage):
    path = saved_adapter / "adapter_model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\xff" * 8 + raw[8:])
    model = ours_from(tiny_ckpt)
    with pytest.raises(lora.AdapterError, match=f"{path}: truncated or corrupt safetensors file"):
        lora.load_adapter(model, saved_adapter)
    assert not lora.lora_layers(model)


def test_base_fingerprint_saved_and_checked(tiny_ckpt, saved_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    recorded = json.loads((saved_adapter / "base_model.json").read_text())
    # written by hand: the tiny config's fields (tests/conftest.py TINY, head_dim 64 / 4) as canonical JSON,
    # and the checkpoint file's own SHA-256
    canonical = ('{"head_dim":16,"hidden_size":64,"intermediate_size":128,"max_position_embeddings":4096,'
                 '"num_attention_heads":4,"num_hidden_layers":2,"num_key_value_heads":2,"rms_norm_eps":1e-06,'
                 '"rope_theta":1000000.0,"tie_word_embeddings":true,"vocab_size":151936}')
    assert recorded == {
        "name_or_path": str(tiny_ckpt), "config_sha256": hashlib.sha256(canonical.encode()).hexdigest(),
        "checkpoint_sha256": {"model.safetensors": hashlib.sha256((tiny_ckpt / "model.safetensors").read_bytes())
                              .hexdigest()}}
    notes: list[str] = []
    lora.load_adapter(ours_from(tiny_ckpt), saved_adapter, warn=notes)  # the same base: accepted, silently
    assert notes == []

    # The same architecture with other weights: another checkpoint hash.
    other = tmp_path / "other"
    other.mkdir()
    for f in tiny_ckpt.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(other / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    model = ours_from(other)
    with pytest.raises(lora.AdapterError, match=r"trained on another base model: .*model.safetensors "
                                                f"{recorded['checkpoint_sha256']['model.safetensors']}.*"
                                                "pass allow_other_base=True"):
        lora.load_adapter(model, saved_adapter)
    assert not lora.lora_layers(model)
    assert lora.load_adapter(model, saved_adapter, allow_other_base=True, warn=notes)
    assert len(notes) == 1 and "another base model" in notes[0]
    assert model.checkpoint_sha256 == lora.base_fingerprint(model)["checkpoint_sha256"]  # hashed once, kept
    with pytest.warns(UserWarning, match="another base model"):
        lora.load_adapter(ours_from(other), saved_adapter, allow_other_base=True)

    # Another config (the meta shape used for planning knows no checkpoint: the config alone decides).
    with torch.device("meta"):
        shape = Qwen2(qwen_min.load_config(tiny_ckpt).__class__(**{**vars(ours_from(tiny_ckpt).config),
                                                                     "rms_norm_eps": 1e-5}))
    with pytest.raises(lora.AdapterError, match="another base model"):
        lora.load_adapter(shape, saved_adapter)
    with torch.device("meta"):
        same = Qwen2(qwen_min.load_config(tiny_ckpt))
    lora.load_adapter(same, saved_adapter)


def test_an_adapter_without_base_model_json_loads_with_a_note(tiny_ckpt, saved_adapter, tmp_path):
    """An adapter PEFT wrote has no base_model.json: it loads, and the caller is told its base went unchecked."""
    theirs = peft_lora(hf_model(tiny_ckpt), 4, 8, ("q_proj", "v_proj"))
    copy_lora_into_peft(_randomized(tiny_ckpt), theirs)
    theirs.save_pretrained(tmp_path / "peft")
    assert not (tmp_path / "peft" / "base_model.json").exists()
    ids = random_ids()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits

    notes: list[str] = []
    model = ours_from(tiny_ckpt)
    assert lora.load_adapter(model, tmp_path / "peft", warn=notes)
    [note] = notes
    assert f"adapter {tmp_path / 'peft'} has no base_model.json" in note and "could not be checked" in note
    assert f"model.safetensors {hashlib.sha256((tiny_ckpt / 'model.safetensors').read_bytes()).hexdigest()}" in note
    with torch.no_grad():
        assert maxdiff(model(ids), want) <= PEFT_TOL  # loaded all the same
    with pytest.warns(UserWarning, match="has no base_model.json.*could not be checked"):
        lora.load_adapter(ours_from(tiny_ckpt), tmp_path / "peft")

    # ours, with the file there: no note; with it deleted by hand: the same note
    notes.clear()
    lora.load_adapter(ours_from(tiny_ckpt), saved_adapter, warn=notes)
    assert notes == []
    (saved_adapter / "base_model.json").unlink()
    lora.load_adapter(ours_from(tiny_ckpt), saved_adapter, warn=notes)
    assert len(notes) == 1 and "has no base_model.json" in notes[0]


# ---- saved whole or not at all: a save cut short at any write point leaves the old adapter or the new one


def _randomized(ckpt, seed: int = 0, **kw):
    """The tiny model with LoRA (rank 4, alpha 8, q and v) and random A, B (and lm_head bias, if asked)."""
    model = ours_from(ckpt)
    lora.apply_lora(model, rank=4, alpha=8, **kw)
    randomize_lora(model, seed=seed)
    return model


def _folder_bytes(folder) -> dict[str, bytes] | None:
    """Every file of a folder by name, or None when there is no folder."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else None


def _hidden_siblings(folder) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


class _OsWithTripwires:
    """``os`` as lora.swap sees it, with some functions replaced."""

    def __init__(self, **replaced) -> None:
        self.__dict__.update(replaced)

    def __getattr__(self, name: str):
        return getattr(os, name)


def _arm(monkeypatch, at: int | None, fault) -> list[str]:
    """Count every call a save makes that writes, syncs or renames; the ``at``-th (1-based; None: none) runs
    ``fault`` instead, and a file write is cut off halfway first. Returns the names of the calls made."""
    calls: list[str] = []

    def wrap(name, real):
        def point(*args):
            calls.append(name)
            if len(calls) == at:
                if name == "write_file":
                    path, data = args
                    real(path, data[: len(data) // 2])
                fault()
            return real(*args)
        return point

    for name in ("write_file", "fsync_path", "exchange"):
        monkeypatch.setattr(swap, name, wrap(name, getattr(swap, name)))
    monkeypatch.setattr(swap, "os", _OsWithTripwires(mkdir=wrap("mkdir", os.mkdir), rename=wrap("rename", os.rename)))
    return calls


def _disk_full() -> None:
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def _killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("swap_kind", ["exchange", "two renames"])
@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_a_save_cut_short_at_any_write_point_leaves_the_old_adapter_or_the_new_one_whole(
        tiny_ckpt, tmp_path, monkeypatch, fault, swap_kind):
    """Every write point of a save (each file's write, cut off halfway; each fsync; the folder made; the swap)
    either raises ENOSPC or SIGKILLs the saving process. After each, the folder is byte for byte the old
    adapter (before the swap) or the new one (after it), never a mixture, and loads as that adapter; only the
    two-rename swap, killed between its renames, leaves no folder, and then the loader names both complete
    folders. The next save succeeds and leaves no hidden sibling."""
    if swap_kind == "two renames":  # (as on a file system without renameat2's RENAME_EXCHANGE)
        monkeypatch.setattr(swap, "exchange", lambda a, b: False)
    models = {"old": _randomized(tiny_ckpt, seed=1, train_lm_head_bias=True),
              "new": _randomized(tiny_ckpt, seed=2, train_lm_head_bias=True)}
    folder = tmp_path / "adapter"

    def save(which: str) -> None:  # with files that belong with the adapter, as the experiments' runs save it
        lora.save_adapter(models[which], folder, extra_files={"splits.json": which.encode()},
                          write_extra=lambda new: swap.write_file(new / "data.json", which.encode()))

    save("new")
    content = {"new": _folder_bytes(folder)}
    save("old")
    content["old"] = _folder_bytes(folder)
    assert set(content["old"]) == {"adapter_config.json", "adapter_model.safetensors", "base_model.json",
                                   "lm_head_bias.safetensors", "splits.json", "data.json"}
    assert all(content["old"][f] != content["new"][f] for f in ("adapter_model.safetensors", "splits.json"))
    with monkeypatch.context() as m:
        points = _arm(m, None, None)
        save("new")
    save("old")

    probe = ours_from(tiny_ckpt)  # loads each outcome (the values overwrite the last ones)
    outcomes = []
    for at in range(1, len(points) + 1):
        with monkeypatch.context() as m:
            _arm(m, at, _disk_full if fault == "raise" else _killed)
            if fault == "raise":
                with pytest.raises(OSError, match="injected"):
                    save("new")
            else:
                pid = os.fork()
                if pid == 0:  # the child saves until it is killed at write point ``at``
                    try:
                        save("new")
                    finally:
                        os._exit(0)
                assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == -signal.SIGKILL
        where = f"write point {at} of {len(points)} ({points[at - 1]})"
        got = _folder_bytes(folder)
        if got is None:
            with pytest.raises(lora.AdapterError, match="interrupted between moving the old folder aside") as e:
                lora.load_adapter(probe, folder)
            [aside] = leftovers(folder, REPLACED)
            [saving] = leftovers(folder, SAVING)
            assert f"{aside} holds the old one and {saving} the new one" in str(e.value), where
            assert (_folder_bytes(aside), _folder_bytes(saving)) == (content["old"], content["new"]), where
            outcomes.append("none")
        else:
            [which] = [w for w in ("old", "new") if got == content[w]] or [f"a mixture at {where}"]
            lora.load_adapter(probe, folder)
            for name, layer in lora.lora_layers(probe).items():
                assert torch.equal(layer.lora_A.weight, lora.lora_layers(models[which])[name].lora_A.weight), where
            assert torch.equal(lora.lm_head_bias(probe), lora.lm_head_bias(models[which])), where
            if fault == "raise" and which == "old":
                assert _hidden_siblings(folder) == [], where  # the failed save removed its new folder
            outcomes.append(which)
        save("old")
        assert _folder_bytes(folder) == content["old"] and _hidden_siblings(folder) == []

    # the old adapter up to the swap, then the new one; between two renames a kill leaves neither in place,
    # and an error puts the old one back
    swap_at = points.index("exchange" if swap_kind == "exchange" else "rename")
    second = ([] if swap_kind == "exchange" else ["none"] if fault == "kill" else ["old"])
    assert outcomes == ["old"] * (swap_at + 1) + second + ["new"] * (len(points) - swap_at - 1 - len(second)), points
    assert points.count("write_file") == 6 and points.count("fsync_path") == 6 + 2  # six files, the folder, its parent


def test_save_adapter_replaces_the_folder_whole_and_refuses_what_is_not_an_adapter(tiny_ckpt, saved_adapter,
                                                                                     tmp_path):
    model = _randomized(tiny_ckpt)
    (saved_adapter / "notes.txt").write_text("from an earlier save")
    lora.save_adapter(model, saved_adapter, extra_files={"encoding.json": b"{}\n"},
                      write_extra=lambda new: (new / "splits.json").write_text("[]\n"))
    assert sorted(p.name for p in saved_adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "base_model.json", "encoding.json", "splits.json"]
    assert (saved_adapter / "encoding.json").read_bytes() == b"{}\n" and _hidden_siblings(saved_adapter) == []

    for name in ("adapter_config.json", "../escape.json", "sub/file.json", ""):
        with pytest.raises(lora.AdapterError, match="extra_files: .* is not a plain file name of its own"):
            lora.save_adapter(model, saved_adapter, extra_files={name: b"x"})
    other = tmp_path / "results"
    other.mkdir()
    (other / "summary.json").write_text("{}")
    with pytest.raises(lora.AdapterError, match="not an adapter .*not empty; saving replaces the folder whole"):
        lora.save_adapter(model, other)
    assert [p.name for p in other.iterdir()] == ["summary.json"] and not (tmp_path / "escape.json").exists()
    with pytest.raises(lora.AdapterError, match="not a folder"):
        lora.save_adapter(model, other / "summary.json")
    assert _folder_bytes(saved_adapter)["encoding.json"] == b"{}\n"  # untouched by the refused saves

    # an interrupted first save: the folder is missing, and the loader says why
    first = tmp_path / "first"
    (tmp_path / ".first.saving-0123").mkdir()
    with pytest.raises(lora.AdapterError, match="its first save was interrupted before it finished"):
        lora.load_adapter(ours_from(tiny_ckpt), first)
    lora.save_adapter(model, first)
    assert _hidden_siblings(first) == [] and lora.load_adapter(ours_from(tiny_ckpt), first)
