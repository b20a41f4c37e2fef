"""Adapters on disk, in PEFT's layout, and merged checkpoints in the Hub layout.

An adapter folder holds what ``PeftModel.save_pretrained`` writes for a LoRA on a causal LM:

  adapter_config.json        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 4,
                              "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none",
                              "fan_in_fan_out": false, "base_model_name_or_path": ..., ...}
  adapter_model.safetensors  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  [r, in]
                             base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  [out, r] ...

The key is PeftModelForCausalLM's path to the tensor: ``base_model`` (the LoraModel) ``.model``
(Qwen2ForCausalLM) ``.model.layers...`` (the decoder), with the adapter name ``default`` removed.
So ``PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(base), folder)`` loads ours, and
``load_adapter`` loads theirs.

A trained lm_head bias has no place in a PEFT LoRA (PEFT could only save the whole lm_head through
``modules_to_save``, untying and copying a vocab x hidden matrix), so it is written next to the
adapter as ``lm_head_bias.safetensors`` with one fp32 tensor, ``lm_head.bias`` [vocab]. PEFT ignores
the file; a PEFT user attaches it in three lines (the same logits as ours, in fp32):

    from safetensors.torch import load_file
    model = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(base), folder)
    bias = load_file(f"{folder}/lm_head_bias.safetensors")["lm_head.bias"]
    model.get_output_embeddings().bias = torch.nn.Parameter(bias.to(model.dtype), requires_grad=False)

A bias-only adapter (rank 0) is saved with ``"r": 0`` and no targets: PEFT refuses that config, as
there is no LoRA in it; load the bias as above onto the plain transformers model.

``base_model.json`` (ours only; PEFT ignores it) records the fingerprint of the base model the adapter
was trained on: the SHA-256 of its config (the canonical JSON of qwen_min's config fields) and, when
the model was loaded from a checkpoint, the SHA-256 of each safetensors file. ``load_adapter``
refuses a model with another fingerprint (a LoRA update only means something on the weights it was
trained against) unless ``allow_other_base=True``, which records a warning instead. An adapter without
the file (PEFT's, an older one, one edited by hand) still loads, with a note that its base could not be
checked (both notes go to ``load_adapter``'s ``warn`` list, or to ``warnings.warn``). Weights that are
not finite are refused.

``save_adapter`` writes the folder whole or not at all (``lora.swap``): a crash at any moment leaves the
complete previous adapter or the complete new one, and files that belong with the adapter (the
experiments' encoding and splits) are written into the same swap through ``extra_files`` or ``write_extra``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from lora.inject import LINEAR_TARGETS, apply_lora, lm_head_bias, lora_layers
from lora.layer import LoRALinear
from lora.swap import interrupted_save, write_folder

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BIAS_FILE = "lm_head_bias.safetensors"
BIAS_KEY = "lm_head.bias"
BASE_FILE = "base_model.json"
PREFIX = "base_model.model.model."  # PeftModelForCausalLM -> LoraModel -> Qwen2ForCausalLM -> Qwen2Model

# adapter_config.json fields that change the maths (or what is trained) and that we do not implement;
# each must be absent or hold one of these "off" values.
UNSUPPORTED_OFF: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None), "use_rslora": (False, None), "fan_in_fan_out": (False, None),
    "bias": ("none", None), "lora_bias": (False, None), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
    "layers_to_transform": (None, []), "modules_to_save": (None, []), "exclude_modules": (None, []),
    "target_parameters": (None, []), "trainable_token_indices": (None, {}, []), "layer_replication": (None, []),
    "use_qalora": (False, None), "use_bdlora": (False, None), "alora_invocation_tokens": (None, []),
}


class AdapterError(ValueError):
    """An adapter folder that cannot be read, or that does not fit the model."""


@contextmanager
def _open(path: Path) -> Iterator[Any]:
    """safe_open on an adapter file; a file safetensors cannot parse (truncated, a garbage header) is an
    AdapterError naming it."""
    try:
        with safe_open(str(path), "pt") as f:
            yield f
    except SafetensorError as e:
        raise AdapterError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def _finite(path: Path, key: str, t: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise AdapterError(f"{path}: tensor {key} has {bad} non-finite value(s) (NaN or inf) of {t.numel()}; "
                           "the adapter is damaged or its training diverged")
    return t


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the base model: {"name_or_path", "config_sha256", "checkpoint_sha256"}.

    config_sha256 is the SHA-256 of the canonical JSON (sorted keys, no spaces) of the model's
    config fields; checkpoint_sha256 maps each safetensors file the model was loaded from
    (``model.checkpoint_files``, set by ``qwen_min.from_pretrained``) to its SHA-256, or is None when
    unknown (a model built in memory, or the meta-device shape used for planning). The file hashes
    are computed once per model and kept on it (``model.checkpoint_sha256``).
    """
    from dataclasses import asdict

    canonical = json.dumps(asdict(model.config), sort_keys=True, separators=(",", ":"))
    digests = getattr(model, "checkpoint_sha256", None)
    files = getattr(model, "checkpoint_files", None)
    if digests is None and files:
        digests = {Path(f).name: _sha256(Path(f)) for f in files}
        model.checkpoint_sha256 = digests
    return {"name_or_path": getattr(model, "name_or_path", None),
            "config_sha256": hashlib.sha256(canonical.encode()).hexdigest(), "checkpoint_sha256": digests}


def _note(msg: str, warn: list[str] | None) -> None:
    """A load that goes ahead but must not pass silently: appended to ``warn``, or issued as a warning."""
    if warn is None:
        warnings.warn(msg, stacklevel=4)
    else:
        warn.append(msg)


def _show(fp: dict[str, Any]) -> str:
    """A base fingerprint in words: its name, config hash and checkpoint files' hashes."""
    ckpt = fp.get("checkpoint_sha256")
    files = ", ".join(f"{k} {v}" for k, v in ckpt.items()) if ckpt else "checkpoint unknown"
    return f"{fp.get('name_or_path')} (config sha256 {fp['config_sha256']}; {files})"


def _check_base(directory: Path, model: nn.Module, allow_other_base: bool, warn: list[str] | None) -> None:
    """Compare the adapter's recorded base fingerprint with the model's (see the module docstring)."""
    path = directory / BASE_FILE
    if not path.is_file():
        _note(f"adapter {directory} has no {BASE_FILE} (PEFT writes none, lora.save_adapter always does), so the base "
              f"model it was trained on could not be checked; it is loaded into {_show(base_fingerprint(model))} "
              "as it is", warn)
        return
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError:
        recorded = None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("config_sha256"), str):
        raise AdapterError(f"{path}: not a base-model fingerprint (a JSON object with config_sha256)")
    mine = base_fingerprint(model)
    differs = recorded["config_sha256"] != mine["config_sha256"]
    theirs_ckpt, my_ckpt = recorded.get("checkpoint_sha256"), mine["checkpoint_sha256"]
    if theirs_ckpt and my_ckpt:  # compared only where both sides know their files
        differs = differs or theirs_ckpt != my_ckpt
    if not differs:
        return
    msg = (f"adapter {directory} was trained on another base model: {_show(recorded)}; the model it is loaded "
           f"into is {_show(mine)}")
    if not allow_other_base:
        raise AdapterError(f"{msg}; pass allow_other_base=True (--allow-other-base) to load it anyway")
    _note(msg, warn)


def _peft_key(name: str, which: str) -> str:
    """layers.0.self_attn.q_proj, lora_A -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"""
    return f"{PREFIX}{name}.{which}.weight"


def _adapter_settings(model: nn.Module) -> tuple[int, float, float, list[str]] | None:
    """(rank, alpha, dropout, sorted target names) of the LoRA in the model, or None without LoRALinear."""
    layers = lora_layers(model)
    if not layers:
        return None
    settings = {(m.rank, m.alpha, getattr(m.lora_dropout, "p", 0.0)) for m in layers.values()}
    if len(settings) > 1:
        raise AdapterError(f"the model's LoRA layers differ in (rank, alpha, dropout): {sorted(settings)}; "
                           "one adapter config cannot describe them")
    rank, alpha, dropout = settings.pop()
    return rank, alpha, dropout, sorted({n.rpartition(".")[2] for n in layers})


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                 extra_files: Mapping[str, bytes] | None = None,
                 write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write the model's LoRA (and lm_head bias, if trained) in PEFT's layout; returns the folder.

    The folder is replaced whole (``lora.swap``): everything is written into a hidden sibling, synced, and
    swapped in, so a crash leaves the complete old adapter or the complete new one, never a mixture, and
    nothing else that was in the folder survives. What belongs with the adapter goes into the same swap:
    ``extra_files`` (file name -> bytes) and whatever ``write_extra(folder)`` writes into the new folder
    (it is called with the hidden folder, before the swap). A folder that is there and is not an adapter
    (no adapter_config.json, not empty) is refused rather than replaced.

    base_model_name_or_path defaults to the name the model was loaded from (``model.name_or_path``).
    """
    settings = _adapter_settings(model)
    bias = lm_head_bias(model)
    if settings is None and bias is None:
        raise AdapterError("nothing to save: the model has no LoRA layers and no lm_head bias (apply_lora first)")
    rank, alpha, dropout, targets = settings or (0, 0.0, 0.0, [])
    directory = Path(directory)
    _refuse_to_replace(directory)

    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[_peft_key(name, "lora_A")] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[_peft_key(name, "lora_B")] = layer.lora_B.weight.detach().cpu().contiguous()
    files = {WEIGHTS_FILE: save(tensors, metadata={"format": "pt"})}
    if bias is not None:
        files[BIAS_FILE] = save({BIAS_KEY: bias.detach().cpu().contiguous()}, metadata={"format": "pt"})

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None),
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    files[CONFIG_FILE] = (json.dumps(config, indent=2) + "\n").encode()
    if hasattr(model, "config"):
        files[BASE_FILE] = (json.dumps(base_fingerprint(model), indent=2) + "\n").encode()
    for name in extra_files or {}:
        if name in files or Path(name).name != name or name in ("", ".", ".."):
            raise AdapterError(f"extra_files: {name!r} is not a plain file name of its own (the adapter writes "
                               f"{', '.join(sorted(files))})")
    return write_folder(directory, {**files, **(extra_files or {})}, write_extra)


def _refuse_to_replace(directory: Path) -> None:
    """save_adapter replaces the folder whole: refuse a path that holds something other than an adapter."""
    if directory.is_dir():
        if not (directory / CONFIG_FILE).is_file() and any(directory.iterdir()):
            raise AdapterError(f"{directory}: a folder that is not an adapter (no {CONFIG_FILE}) and not empty; "
                               "saving replaces the folder whole, so choose a new or empty folder, or an adapter's")
    elif os.path.lexists(directory):
        raise AdapterError(f"{directory}: not a folder; choose a folder for the adapter")


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(interrupted_save(directory) or f"{path}: no such file (not an adapter folder)") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters are supported")
    for field, off in UNSUPPORTED_OFF.items():
        if field in config and config[field] not in off:
            raise AdapterError(f"{path}: {field}={config[field]!r} is not supported (plain LoRA only)")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise AdapterError(f"{path}: missing field {field!r}")
    if not isinstance(config["r"], int) or isinstance(config["r"], bool) or config["r"] < 0:
        raise AdapterError(f"{path}: r must be a non-negative integer, got {config['r']!r}")
    return config


def _peft_targets(target_modules: str | list[str] | None, hf_name: str) -> bool:
    """PEFT's rule: a string is a regex that must match the whole module name ("all-linear": every
    linear but the output layer); a list matches a name exactly or as a dotted suffix."""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            return hf_name.rpartition(".")[2] in LINEAR_TARGETS
        return re.fullmatch(target_modules, hf_name) is not None
    return hf_name in target_modules or any(hf_name.endswith(f".{t}") for t in target_modules)


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, allow_other_base: bool = False,
                 warn: list[str] | None = None) -> list[str]:
    """Load a LoRA adapter (ours or PEFT's) into the model; returns the adapted module names.

    A model without LoRA gets it applied with the adapter's settings (rank, alpha, dropout, targets,
    lm_head bias), every other parameter frozen. A model that already has LoRA must have the same
    rank, alpha, targets and bias (its dropout is kept); it then just receives the values. On a
    meta-device model only the structure is applied (useful for counting FLOPs). Nothing in the
    model changes unless every check passes: the files parse, every tensor is finite and has its
    shape, and the adapter's base-model fingerprint (base_model.json) is the model's. Another base is
    refused unless ``allow_other_base``; then the note is appended to ``warn`` (or, without a list,
    issued with ``warnings.warn``).
    """
    directory = Path(directory)
    config = _read_config(directory)
    rank, alpha, dropout = config["r"], float(config["lora_alpha"]), float(config.get("lora_dropout") or 0.0)
    weights_path, bias_path = directory / WEIGHTS_FILE, directory / BIAS_FILE
    has_bias = bias_path.exists()

    # ---- which of the model's linears the config targets; the weight file must hold exactly those
    existing = lora_layers(model)
    linears: dict[str, nn.Linear] = {}  # every adaptable linear, by our module name
    for name, m in model.named_modules():
        if name.rpartition(".")[2] in LINEAR_TARGETS and isinstance(m, (nn.Linear, LoRALinear)):
            linears[name] = m.base_layer if isinstance(m, LoRALinear) else m
    targeted = sorted(n for n in linears if _peft_targets(config["target_modules"], "model." + n))
    targets = sorted({n.rpartition(".")[2] for n in targeted})
    if partial := sorted(n for n in linears if n.rpartition(".")[2] in targets and n not in targeted):
        raise AdapterError(f"{directory / CONFIG_FILE}: target_modules {config['target_modules']!r} adapts "
                           f"{', '.join(targets)} in some layers only (not {', '.join(partial[:4])}); "
                           "LoRA here covers every layer")
    if rank == 0 and targeted:
        raise AdapterError(f"{directory / CONFIG_FILE}: r is 0 but target_modules {config['target_modules']!r} "
                           "names layers of the model")
    if not weights_path.exists():
        if targeted:
            raise AdapterError(f"{weights_path}: no such file")
        shapes = {}
    else:
        with _open(weights_path) as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    expected = {_peft_key(n, w): n for n in targeted for w in ("lora_A", "lora_B")}
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise AdapterError(f"{weights_path}: tensor(s) {', '.join(unexpected[:6])} match no LoRA layer this model "
                           f"gets from target_modules {config['target_modules']!r}")
    if missing := sorted(set(expected) - set(shapes)):
        raise AdapterError(f"{weights_path}: missing tensor(s) {', '.join(missing[:6])} "
                           f"for target_modules {config['target_modules']!r}")
    for name in targeted:
        lin = linears[name]
        for which, want in (("lora_A", (rank, lin.in_features)), ("lora_B", (lin.out_features, rank))):
            got = shapes[_peft_key(name, which)]
            if got != want:
                raise AdapterError(f"{weights_path}: {_peft_key(name, which)} has shape {got}; the model's {name} "
                                   f"({lin.in_features} -> {lin.out_features}) with r={rank} needs {want}")
    if has_bias:
        with _open(bias_path) as f:
            if list(f.keys()) != [BIAS_KEY]:
                raise AdapterError(f"{bias_path}: expected exactly one tensor {BIAS_KEY!r}, found {list(f.keys())}")
            got, want = tuple(f.get_slice(BIAS_KEY).get_shape()), (model.lm_head.out_features,)
            if got != want:
                raise AdapterError(f"{bias_path}: {BIAS_KEY} has shape {got}; the model's vocabulary needs {want}")

    # ---- the values, read (they are small) and checked before anything in the model changes
    values = {}
    if shapes:
        with _open(weights_path) as f:
            values = {k: _finite(weights_path, k, f.get_tensor(k)) for k in shapes}
    if has_bias:
        with _open(bias_path) as f:
            values[BIAS_KEY] = _finite(bias_path, BIAS_KEY, f.get_tensor(BIAS_KEY))
    if hasattr(model, "config"):
        _check_base(directory, model, allow_other_base, warn)

    # ---- a model that already has LoRA must have the same kind
    settings = _adapter_settings(model)
    model_bias = lm_head_bias(model) is not None
    if settings is not None or model_bias:
        m_rank, m_alpha, _, m_targets = settings or (0, 0.0, 0.0, [])
        mismatches = []
        if m_rank != rank:
            mismatches.append(f"rank {m_rank} vs r={rank}")
        if m_targets != targets:
            mismatches.append(f"targets {m_targets} vs {targets}")
        if rank > 0 and m_rank > 0 and m_alpha != alpha:
            mismatches.append(f"alpha {m_alpha:g} vs lora_alpha={alpha:g}")
        if model_bias != has_bias:
            mismatches.append("lm_head bias " + ("present vs absent" if model_bias else "absent vs present"))
        if mismatches:
            raise AdapterError(f"{directory}: the model's LoRA does not match the adapter (model vs adapter): "
                               + "; ".join(mismatches) + " (load into a model without LoRA to apply the adapter's)")
        if merged := [n for n, m in existing.items() if m.merged]:
            raise AdapterError(f"the model's LoRA is merged ({merged[0]}, ...): unmerge_lora(model) before loading")
    else:
        apply_lora(model, rank=rank, alpha=alpha if rank > 0 else None, targets=targets, dropout=dropout,
                   train_lm_head_bias=has_bias)

    # ---- the values (skipped on the meta device, where there is no storage to fill)
    layers = lora_layers(model)
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_A.weight.copy_(values[_peft_key(name, "lora_A")])
                layer.lora_B.weight.copy_(values[_peft_key(name, "lora_B")])
            if has_bias:
                lm_head_bias(model).copy_(values[BIAS_KEY])
    return list(layers)


def export_merged(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model with its adapters folded in as a plain Qwen2 checkpoint in the Hub layout
    (config.json + model.safetensors), which ``qwen_min.from_pretrained`` and transformers load.

    The model itself is left as it was: each merged weight, W + scaling * B @ A (fp32 sum, rounded
    once to W's dtype), is a new tensor, put in the LoRA wrapper's place only while the file is
    written. Qwen2 checkpoints have no lm_head bias, so a model that trains one is refused; ship it
    as an adapter (``save_adapter``) instead. Tokenizer files are not copied.
    """
    from qwen_min.load import save_pretrained

    if lm_head_bias(model) is not None:
        raise AdapterError("cannot export a merged Qwen2 checkpoint with a trained lm_head bias: the Qwen2 "
                           "format has no lm_head bias; save it as an adapter with lora.save_adapter instead")
    layers = lora_layers(model)
    plain: dict[str, nn.Linear] = {}
    for name, layer in layers.items():
        base = layer.base_layer
        with torch.device("meta"):
            lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        weight = base.weight.detach()
        if not layer.merged:
            weight = (weight.to(torch.float32) + layer.delta_weight().detach().to(torch.float32)).to(weight.dtype)
        lin.weight = nn.Parameter(weight, requires_grad=False)
        lin.bias = base.bias
        plain[name] = lin
    try:
        for name, lin in plain.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
        return save_pretrained(model, directory)
    finally:
        for name, layer in layers.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
