"""lora against PEFT's LoRA on transformers' Qwen2 (the oracles), plus hand-derived counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lora
import qwen_min
from qwen_min import Qwen2, QwenConfig
from tests.conftest import QWEN25_05B

TOL = 1e-5  # the bound for fp32 logits against PEFT


def _ours(path, dtype=torch.float32) -> Qwen2:
    return qwen_min.from_pretrained(path, dtype=dtype)


def _hf(path, dtype=torch.float32):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _ids(shape=(2, 24), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 151936, shape, generator=torch.Generator().manual_seed(seed))


def _peft(hf_model, r: int, alpha: float, targets, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(hf_model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                                               task_type="CAUSAL_LM", **kw)).eval()


@torch.no_grad()
def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-zero B (and bias) so the adapters matter; A is re-drawn too."""
    g = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    if (bias := lora.lm_head_bias(model)) is not None:
        bias.copy_(torch.randn(bias.shape, generator=g))


@torch.no_grad()
def _copy_into_peft(ours: nn.Module, peft_model) -> None:
    """Our A and B values into PEFT's layers of the same (checkpoint) name."""
    hf = peft_model.base_model.model
    for name, layer in lora.lora_layers(ours).items():
        target = hf.get_submodule("model." + name)
        target.lora_A["default"].weight.copy_(layer.lora_A.weight)
        target.lora_B["default"].weight.copy_(layer.lora_B.weight)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _attach_bias_like_a_peft_user(peft_model, folder) -> None:
    """The snippet from lora/adapter.py's docstring, verbatim."""
    from safetensors.torch import load_file

    model = peft_model
    bias = load_file(f"{folder}/lm_head_bias.safetensors")["lm_head.bias"]
    model.get_output_embeddings().bias = torch.nn.Parameter(bias.to(model.dtype), requires_grad=False)


# ---------------------------------------------------------------------------------------------
# Same A and B: the same logits (and gradients) as PEFT on transformers' Qwen2

CASES = [  # checkpoint, rank, alpha, targets
    ("tiny_ckpt", 4, 8, ("q_proj", "v_proj")),
    ("tiny_untied_ckpt", 3, 5, lora.LINEAR_TARGETS),
]


@pytest.mark.parametrize(("ckpt", "rank", "alpha", "targets"), CASES)
def test_logits_and_grads_match_peft(ckpt, rank, alpha, targets, request):
    path = request.getfixturevalue(ckpt)
    ours = _ours(path)
    wrapped = lora.apply_lora(ours, rank=rank, alpha=alpha, targets=targets)
    n_layers = ours.config.num_hidden_layers
    assert len(wrapped) == n_layers * len(targets)
    _randomize(ours)
    theirs = _peft(_hf(path), rank, alpha, targets)
    _copy_into_peft(ours, theirs)

    ids = _ids()
    a, b = ours(ids), theirs(input_ids=ids).logits
    diff = _maxdiff(a, b)
    print(f"{ckpt} r={rank} alpha={alpha} {len(targets)} targets: logits max |diff| vs PEFT = {diff:.3g}")
    assert diff <= TOL

    # Same loss -> same LoRA gradients (relative to their size).
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    (a * w).sum().backward()
    (b * w).sum().backward()
    hf = theirs.base_model.model
    worst = 0.0
    for name, layer in lora.lora_layers(ours).items():
        target = hf.get_submodule("model." + name)
        for mine, peft_p in ((layer.lora_A.weight, target.lora_A["default"].weight),
                             (layer.lora_B.weight, target.lora_B["default"].weight)):
            worst = max(worst, _maxdiff(mine.grad, peft_p.grad) / peft_p.grad.abs().max().item())
    print(f"{ckpt}: LoRA grads, worst max |diff| / max |grad| vs PEFT = {worst:.3g}")
    assert worst <= 1e-4


def test_bf16_base_fp32_adapter_matches_peft_layer_and_keeps_fp32_precision():
    """A bf16 base with fp32 A, B: ours equals PEFT's lora.Linear bit for bit, and the only bf16
    rounding is the final one (an fp64 reference, rounded once, agrees to within one bf16 step)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(64, 48, bias=True, dtype=torch.bfloat16)

    holder = Holder()
    base = nn.Linear(64, 48, bias=True, dtype=torch.bfloat16)
    base.load_state_dict(holder.q_proj.state_dict())
    ours = lora.LoRALinear(base, rank=4, alpha=8)
    with torch.no_grad():
        ours.lora_B.weight.normal_(0, 0.02)
    peft_model = get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    theirs = peft_model.base_model.model.q_proj
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    assert ours.lora_A.weight.dtype == ours.lora_B.weight.dtype == torch.float32
    assert ours.base_layer.weight.dtype == torch.bfloat16

    x = torch.randn(3, 10, 64).to(torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, theirs(x))

    # fp64 truth: base in bf16 (as the frozen model computes it), adapter exactly, one rounding.
    base_out = base(x).double()
    A, B = ours.lora_A.weight.double(), ours.lora_B.weight.double()
    truth = base_out + 2.0 * (x.double() @ A.T @ B.T)
    ref = truth.to(torch.bfloat16)
    ulp = torch.finfo(torch.bfloat16).eps * truth.abs().clamp(min=1e-3)
    assert ((y.double() - ref.double()).abs() <= ulp + 1e-12).all()
    # Sharper, on a zero base so the adapter is all there is: one rounding of the exact product
    # (within half a bf16 step, u = 2^-8), where an adapter run in bf16 rounds x A, then B, again.
    zero = nn.Linear(64, 48, bias=False, dtype=torch.bfloat16)
    nn.init.zeros_(zero.weight)
    only = lora.LoRALinear(zero, rank=4, alpha=8)
    with torch.no_grad():
        only.lora_A.weight.copy_(ours.lora_A.weight)
        only.lora_B.weight.copy_(ours.lora_B.weight)
    exact = 2.0 * (x.double() @ A.T @ B.T)
    u = torch.finfo(torch.bfloat16).eps / 2
    rel_ours = ((only(x).double() - exact).abs() / exact.abs()).max().item()
    naive = 2.0 * ((x @ A.T.to(torch.bfloat16)) @ B.T.to(torch.bfloat16))
    rel_naive = ((naive.double() - exact).abs() / exact.abs()).max().item()
    print(f"bf16 base: adapter output max relative error vs fp64, ours {rel_ours:.3g} (u = {u:.3g}), "
          f"all-bf16 adapter path {rel_naive:.3g}")
    assert rel_ours <= u * (1 + 1e-3) < rel_naive

    # The adapter gradient is an fp32 computation: it matches fp64 to fp32 precision.
    g = torch.randn(y.shape).to(torch.bfloat16)
    (y.float() * g.float()).sum().backward()
    gA = 2.0 * (B.T @ (g.double().reshape(-1, 48).T @ x.double().reshape(-1, 64)))
    assert ours.lora_A.weight.grad.dtype == torch.float32
    rel = _maxdiff(ours.lora_A.weight.grad, gA) / gA.abs().max().item()
    print(f"bf16 base: dL/dA relative error vs fp64 = {rel:.3g}")
    assert rel <= 1e-5


# ---------------------------------------------------------------------------------------------
# Adapters on disk: ours -> PEFT, PEFT -> ours


def test_saved_adapter_loads_in_peft_and_matches_peft_own_format(tiny_ckpt, tmp_path):
    from peft import PeftModel

    ours = _ours(tiny_ckpt)
    lora.apply_lora(ours, rank=4, alpha=8)
    _randomize(ours)
    lora.save_adapter(ours, tmp_path / "ours", base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    theirs = PeftModel.from_pretrained(_hf(tiny_ckpt), tmp_path / "ours").eval()
    ids = _ids()
    with torch.no_grad():
        diff = _maxdiff(ours(ids), theirs(input_ids=ids).logits)
    print(f"our adapter in PeftModel.from_pretrained: logits max |diff| = {diff:.3g}")
    assert diff <= TOL

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
    theirs = _peft(_hf(tiny_untied_ckpt), 6, 16, targets)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=g)
    theirs.save_pretrained(tmp_path / "peft")
    ids = _ids()
    with torch.no_grad():
        want = theirs(input_ids=ids).logits

    ours = _ours(tiny_untied_ckpt)
    names = lora.load_adapter(ours, tmp_path / "peft")
    assert len(names) == ours.config.num_hidden_layers * len(targets)
    layer = lora.lora_layers(ours)["layers.1.self_attn.k_proj"]
    assert (layer.rank, layer.alpha, layer.scaling) == (6, 16.0, 16 / 6)
    with torch.no_grad():
        diff = _maxdiff(ours(ids), want)
    print(f"PEFT adapter loaded here: logits max |diff| = {diff:.3g}")
    assert diff <= TOL
    counts = lora.trainable_parameters(ours)
    assert counts["total"] == counts["lora_A"] + counts["lora_B"] == theirs.get_nb_trainable_parameters()[0]

    # A regex target_modules string (PEFT's other form) selects the same layers.
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = r"model\.layers\.\d+\.(self_attn\.(q|k|o)_proj|mlp\.down_proj)"
    cfg_path.write_text(json.dumps(cfg))
    again = _ours(tiny_untied_ckpt)
    assert lora.load_adapter(again, tmp_path / "peft") == names
    # Loading into a model whose LoRA already matches just overwrites the values.
    lora.load_adapter(again, tmp_path / "peft")
    with torch.no_grad():
        assert _maxdiff(again(ids), want) <= TOL


def test_lm_head_bias_saved_alongside_and_reproduced_by_peft_user(tiny_ckpt, tmp_path):
    from peft import PeftModel

    ours = _ours(tiny_ckpt)
    lora.apply_lora(ours, rank=2, train_lm_head_bias=True)
    assert ours.lm_head.weight is ours.embed_tokens.weight  # still tied
    _randomize(ours)
    folder = tmp_path / "adapter"
    lora.save_adapter(ours, folder)
    with safe_open(str(folder / "lm_head_bias.safetensors"), "pt") as f:
        assert list(f.keys()) == ["lm_head.bias"] and f.get_tensor("lm_head.bias").dtype == torch.float32

    peft_model = PeftModel.from_pretrained(_hf(tiny_ckpt), folder).eval()
    _attach_bias_like_a_peft_user(peft_model, folder)
    ids = _ids()
    with torch.no_grad():
        a = ours(ids)
        diff = _maxdiff(a, peft_model(input_ids=ids).logits)
    print(f"LoRA + lm_head bias vs PEFT + attached bias: logits max |diff| = {diff:.3g}")
    assert diff <= TOL

    back = _ours(tiny_ckpt)
    lora.load_adapter(back, folder)
    assert back.lm_head.weight is back.embed_tokens.weight
    assert lora.trainable_parameters(back)["lm_head_bias"] == 151936
    with torch.no_grad():
        assert torch.equal(back(ids), a)

    # A new save without the bias removes the stale bias file.
    plain = _ours(tiny_ckpt)
    lora.apply_lora(plain, rank=2)
    lora.save_adapter(plain, folder)
    assert not (folder / "lm_head_bias.safetensors").exists()


def test_bias_only_rank0(tiny_ckpt, tmp_path):
    ours = _ours(tiny_ckpt)
    ids = _ids()
    with torch.no_grad():
        before = ours(ids)
    assert lora.apply_lora(ours, rank=0, train_lm_head_bias=True) == []
    assert lora.trainable_parameters(ours) == {"lora_A": 0, "lora_B": 0, "lm_head_bias": 151936, "other": 0,
                                               "total": 151936}
    with torch.no_grad():
        assert torch.equal(ours(ids), before)
        lora.lm_head_bias(ours).copy_(torch.linspace(-1, 1, 151936))
        want = before + torch.linspace(-1, 1, 151936)
        assert _maxdiff(ours(ids), want) <= TOL
    lora.save_adapter(ours, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 0
    back = _ours(tiny_ckpt)
    assert lora.load_adapter(back, tmp_path / "a") == []
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))

    nothing = _ours(tiny_ckpt)
    assert lora.apply_lora(nothing, rank=0) == []
    assert lora.trainable_parameters(nothing)["total"] == 0


# ---------------------------------------------------------------------------------------------
# Training: what gets gradients, what stays put


@pytest.mark.parametrize("bias", [False, True])
def test_only_lora_gets_grads_and_base_is_bit_identical_after_a_step(tiny_ckpt, bias):
    model = _ours(tiny_ckpt)
    lora.apply_lora(model, rank=4, dropout=0.1, train_lm_head_bias=bias)
    model.train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and n != "lm_head.bias"}
    assert base  # the frozen weights
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"layers.{i}.self_attn.{t}.lora_{w}.weight" for i in range(2) for t in ("q_proj", "v_proj")
                for w in "AB"} | ({"lm_head.bias"} if bias else set())
    assert trainable == expected

    ids = _ids((2, 16))
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected
    # Even an optimizer handed every parameter, with weight decay, moves only the trained ones.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before_B = model.layers[0].self_attn.q_proj.lora_B.weight.detach().clone()
    opt.step()
    after = dict(model.named_parameters())
    for n, p in base.items():
        assert torch.equal(after[n], p), n
    assert not torch.equal(model.layers[0].self_attn.q_proj.lora_B.weight, before_B)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_chunked_loss_sees_lora_and_bias(tiny_ckpt):
    """qwen_min's fused loss reads lm_head.weight / lm_head.bias directly: with LoRA and the bias it
    gives the loss and bias gradient of plain cross-entropy on our logits."""
    model = _ours(tiny_ckpt)
    lora.apply_lora(model, rank=4, train_lm_head_bias=True)
    _randomize(model)
    ids = _ids((2, 16))
    labels = ids.roll(-1, 1)
    fused = qwen_min.chunked_cross_entropy(model.hidden(ids), model.lm_head, labels, chunk_size=7)
    fused.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(ids)
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    plain.backward()
    assert abs(fused.item() - plain.item()) <= 1e-5
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert _maxdiff(grads[n], p.grad) <= 1e-5 * p.grad.abs().max().item() + 1e-9, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fresh_lora_leaves_logits_bit_identical(tiny_ckpt, dtype, bias):
    model = _ours(tiny_ckpt, dtype)
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
        lora.apply_lora(model, rank=8, targets=lora.LINEAR_TARGETS, train_lm_head_bias=bias)
        after = model(ids)
    assert after.dtype == dtype
    assert torch.equal(before, after)
    layer = model.layers[0].self_attn.q_proj
    assert not layer.lora_B.weight.any()
    # A drawn as nn.Linear's default: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1 / math.sqrt(layer.in_features)
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound


# ---------------------------------------------------------------------------------------------
# Merging


def test_merge_unmerge_fp32_and_peft_merged_weights(tiny_ckpt):
    ours = _ours(tiny_ckpt)
    lora.apply_lora(ours, rank=4, alpha=8)
    _randomize(ours)
    W0 = {n: m.base_layer.weight.detach().clone() for n, m in lora.lora_layers(ours).items()}
    ids = _ids()
    with torch.no_grad():
        unmerged = ours(ids)
        assert len(lora.merge_lora(ours)) == 4
        merged = ours(ids)
    diff = _maxdiff(merged, unmerged)
    print(f"merged vs unmerged logits, fp32: max |diff| = {diff:.3g}")
    assert diff <= TOL

    # PEFT's merge_and_unload of the same adapters gives the same weights.
    theirs = _peft(_hf(tiny_ckpt), 4, 8, ("q_proj", "v_proj"))
    _copy_into_peft(ours, theirs)
    plain = theirs.merge_and_unload()
    for name, layer in lora.lora_layers(ours).items():
        assert _maxdiff(layer.base_layer.weight, plain.get_submodule("model." + name).weight) <= 1e-6, name

    lora.unmerge_lora(ours)
    worst = max(_maxdiff(m.base_layer.weight, W0[n]) for n, m in lora.lora_layers(ours).items())
    print(f"merge -> unmerge, fp32: max |W - W0| = {worst:.3g}")
    assert worst <= 1e-6
    with torch.no_grad():
        assert _maxdiff(ours(ids), unmerged) <= 1e-6


def test_merge_unmerge_bf16_within_bf16_rounding(tiny_ckpt):
    ours = _ours(tiny_ckpt, torch.bfloat16)
    lora.apply_lora(ours, rank=4)
    _randomize(ours)
    layers = lora.lora_layers(ours)
    W0 = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    lora.merge_lora(ours)
    Wm = {}
    for n, m in layers.items():  # merged = (W + BA in fp32), rounded once
        Wm[n] = m.base_layer.weight.detach().clone()
        assert torch.equal(Wm[n], (W0[n].float() + m.delta_weight().detach()).bfloat16())
    lora.unmerge_lora(ours)
    # Two roundings, each within half a bf16 step of its result: |W1 - W0| <= u (|Wm| + |W1|), u = 2^-8.
    u = torch.finfo(torch.bfloat16).eps / 2
    for n, m in layers.items():
        W1 = m.base_layer.weight.float()
        err = (W1 - W0[n].float()).abs()
        assert (err <= u * (Wm[n].float().abs() + W1.abs())).all(), n
        assert (err == 0).float().mean() > 0.5  # most weights come back exactly


def test_remove_lora(tiny_ckpt, tmp_path):
    ids = _ids()
    ours = _ours(tiny_ckpt)
    with torch.no_grad():
        base = ours(ids)
    lora.apply_lora(ours, rank=4, train_lm_head_bias=True)
    _randomize(ours)
    with torch.no_grad():
        adapted = ours(ids)
    names = lora.remove_lora(ours)  # merge=True: keeps what was learnt, bias included
    assert len(names) == 4 and not lora.lora_layers(ours)
    assert type(ours.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert _maxdiff(ours(ids), adapted) <= TOL
    assert lora.trainable_parameters(ours)["total"] == 0

    plain = _ours(tiny_ckpt)
    lora.apply_lora(plain, rank=4, train_lm_head_bias=True)
    _randomize(plain)
    lora.remove_lora(plain, merge=False)  # throws everything away
    assert type(plain.lm_head) is nn.Linear and plain.lm_head.bias is None
    assert plain.lm_head.weight is plain.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(plain(ids), base)
    qwen_min.save_pretrained(plain, tmp_path / "plain")  # a plain Qwen2 again
    lora.apply_lora(plain, rank=2)  # and LoRA can be applied afresh


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "tiny_untied_ckpt"])
def test_export_merged_loads_in_qwen_min_and_transformers(ckpt, request, tmp_path):
    path = request.getfixturevalue(ckpt)
    ours = _ours(path)
    lora.apply_lora(ours, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    _randomize(ours)
    state = {n: t.clone() for n, t in ours.state_dict().items()}
    layers = lora.lora_layers(ours)
    ids = _ids()
    with torch.no_grad():
        want = ours(ids)

    lora.export_merged(ours, tmp_path / "merged")

    # The caller's model is untouched: same modules, same values, not merged.
    assert lora.lora_layers(ours) == layers and not any(m.merged for m in layers.values())
    assert all(torch.equal(t, state[n]) for n, t in ours.state_dict().items())
    # PEFT's merged model on the same adapters is the oracle for the exported weights.
    theirs = _peft(_hf(path), 4, 8, ("q_proj", "v_proj", "down_proj"))
    _copy_into_peft(ours, theirs)
    with torch.no_grad():
        peft_logits = theirs.merge_and_unload()(input_ids=ids).logits
        d_ours = _maxdiff(_ours(tmp_path / "merged")(ids), want)
        d_hf = _maxdiff(_hf(tmp_path / "merged")(input_ids=ids).logits, peft_logits)
    print(f"{ckpt} merged export: qwen_min vs unmerged LoRA {d_ours:.3g}, transformers vs PEFT merged {d_hf:.3g}")
    assert d_ours <= TOL and d_hf <= TOL


# ---------------------------------------------------------------------------------------------
# Parameter counts on the Qwen2.5-0.5B architecture (meta device: no weights needed)


def _meta_qwen05() -> Qwen2:
    with torch.device("meta"):
        return Qwen2(QwenConfig(**QWEN25_05B))


@pytest.mark.parametrize(("rank", "expected"), [(2, 135_168), (4, 270_336), (8, 540_672)])
def test_trainable_parameters_qwen25_05b(rank, expected):
    # Per layer: q_proj A [r, 896] + B [896, r]; v_proj A [r, 896] + B [128, r] (2 KV heads x 64).
    d, kv, layers = 896, 2 * 64, 24
    assert layers * rank * (d + d + d + kv) == expected  # the figures, derived by hand

    model = _meta_qwen05()
    lora.apply_lora(model, rank=rank)
    counts = lora.trainable_parameters(model)
    assert counts == {"lora_A": layers * rank * 2 * d, "lora_B": layers * rank * (d + kv), "lm_head_bias": 0,
                      "other": 0, "total": expected}

    model = _meta_qwen05()
    lora.apply_lora(model, rank=rank, train_lm_head_bias=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert lora.trainable_parameters(model)["total"] == expected + 151_936


def test_trainable_parameters_agree_with_peft_on_meta():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    from tests.conftest import hf_config

    with torch.device("meta"):
        hf = Qwen2ForCausalLM(hf_config(**QWEN25_05B))
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=4, target_modules=list(lora.LINEAR_TARGETS),
                                               task_type="CAUSAL_LM"))
    model = _meta_qwen05()
    lora.apply_lora(model, rank=4, targets=lora.LINEAR_TARGETS)
    assert lora.trainable_parameters(model)["total"] == peft_model.get_nb_trainable_parameters()[0]


def test_load_adapter_on_meta_model_applies_structure(tiny_ckpt, tmp_path):
    ours = _ours(tiny_ckpt)
    lora.apply_lora(ours, rank=4, train_lm_head_bias=True)
    lora.save_adapter(ours, tmp_path / "a")
    with torch.device("meta"):
        shape = Qwen2(ours.config)
    lora.load_adapter(shape, tmp_path / "a")
    assert lora.trainable_parameters(shape) == lora.trainable_parameters(ours)


# ---------------------------------------------------------------------------------------------
# Bad input: each error names what does not match


def test_apply_lora_bad_input(tiny_ckpt):
    model = _meta_qwen05()
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) 'qproj'.*q_proj, k_proj, v_proj"):
        lora.apply_lora(model, targets=("qproj", "v_proj"))
    with pytest.raises(ValueError, match="unknown LoRA target.*'lm_head'"):
        lora.apply_lora(model, targets="lm_head")
    for rank in (-1, 2.5, True, "4"):
        with pytest.raises(ValueError, match=f"LoRA rank must be a non-negative integer.*got {rank!r}"):
            lora.apply_lora(model, rank=rank)
    with pytest.raises(ValueError, match="LoRA alpha must be a positive number, got -1"):
        lora.apply_lora(model, alpha=-1)
    with pytest.raises(ValueError, match=r"LoRA dropout must be in \[0, 1\), got 1.5"):
        lora.apply_lora(model, dropout=1.5)
    with pytest.raises(ValueError, match="rank 4 with no targets"):
        lora.apply_lora(model, targets=())
    assert not lora.lora_layers(model)  # nothing was changed by the refused calls
    assert all(p.requires_grad for p in model.parameters())
    model = _meta_qwen05()
    lora.apply_lora(model)
    with pytest.raises(ValueError, match="already applied.*remove_lora"):
        lora.apply_lora(model)


@pytest.fixture
def saved_adapter(tiny_ckpt, tmp_path):
    """An adapter with rank 4, alpha 8, q and v, saved from the tiny model."""
    model = _ours(tiny_ckpt)
    lora.apply_lora(model, rank=4, alpha=8)
    _randomize(model)
    return lora.save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize(("kw", "message"), [
    (dict(rank=8, alpha=8), "rank 8 vs r=4"),
    (dict(rank=4, alpha=8, targets=("q_proj", "k_proj")), r"targets \['k_proj', 'q_proj'\] vs \['q_proj', 'v_proj'\]"),
    (dict(rank=4, alpha=4), "alpha 4 vs lora_alpha=8"),
    (dict(rank=4, alpha=8, train_lm_head_bias=True), "lm_head bias present vs absent"),
])
def test_load_adapter_into_mismatched_lora(tiny_ckpt, saved_adapter, kw, message):
    model = _ours(tiny_ckpt)
    lora.apply_lora(model, **kw)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(lora.AdapterError, match=f"does not match the adapter.*{message}"):
        lora.load_adapter(model, saved_adapter)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_load_adapter_shape_mismatch_leaves_model_untouched(tiny_untied_ckpt, saved_adapter):
    model = _ours(tiny_untied_ckpt)  # hidden 128, the adapter was made for hidden 64
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
    model = _ours(tiny_ckpt)
    with pytest.raises(lora.AdapterError, match=message):
        lora.load_adapter(model, saved_adapter)
    assert not lora.lora_layers(model)


def test_adapter_errors_misc(tiny_ckpt, saved_adapter, tmp_path):
    model = _ours(tiny_ckpt)
    with pytest.raises(lora.AdapterError, match="adapter_config.json: no such file"):
        lora.load_adapter(model, tmp_path / "nowhere")
    with pytest.raises(lora.AdapterError, match="nothing to save"):
        lora.save_adapter(model, tmp_path / "empty")
    lora.apply_lora(model, rank=4, alpha=8)
    lora.merge_lora(model)
    with pytest.raises(lora.AdapterError, match="merged.*unmerge_lora"):
        lora.load_adapter(model, saved_adapter)
    biased = _ours(tiny_ckpt)
    lora.apply_lora(biased, rank=2, train_lm_head_bias=True)
    with pytest.raises(lora.AdapterError, match="cannot export a merged Qwen2 checkpoint with a trained lm_head bias"):
        lora.export_merged(biased, tmp_path / "merged")
    with pytest.raises(qwen_min.CheckpointError, match="no Qwen2 checkpoint name"):
        qwen_min.save_pretrained(biased, tmp_path / "raw")


# ---------------------------------------------------------------------------------------------
# The real architecture size


@pytest.mark.slow
def test_qwen25_05b_adapter_roundtrip_with_peft(qwen05_ckpt, tmp_path):
    from peft import PeftModel

    ours = _ours(qwen05_ckpt)
    lora.apply_lora(ours, rank=8)
    assert lora.trainable_parameters(ours)["total"] == 540_672
    _randomize(ours)
    lora.save_adapter(ours, tmp_path / "a")
    ids = _ids((1, 32))
    with torch.no_grad():
        a = ours(ids)
    del ours
    theirs = PeftModel.from_pretrained(_hf(qwen05_ckpt), tmp_path / "a").eval()
    with torch.no_grad():
        diff = _maxdiff(a, theirs(input_ids=ids).logits)
    print(f"Qwen2.5-0.5B config, rank 8: logits max |diff| vs PEFT = {diff:.3g}")
    assert diff <= TOL
