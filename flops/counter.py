"""The analytic FLOP counter: walks a ``qwen_min.Qwen2`` (LoRA-wrapped or not) and prices every
operation its forward pass runs, one documented formula per module kind.

Nothing here knows an architecture: every size is read from the modules (weight shapes, head counts)
or from the call (batch, tokens), so any Qwen2 size — and a model on the meta device — works.

Notation (as in ``qwen_min/model.py``):
    B  batch rows                 T  new tokens per row in this call      P  cached positions (past_len)
    S  = P + T keys per query     N  = B * T token rows                   D  hidden size
    H  query heads                Hkv key/value heads                     hd head_dim
    F  MLP intermediate size      V  vocabulary rows of the output layer  r  LoRA rank
    R  rows that reach the output layer (all N, the scored tokens, or B for generation)

Each priced operation becomes a ``Term`` with its module path (``layers.3.self_attn.q_proj``), a
component (``attn_proj``, ``attention``, ``mlp_act`` ...), its formula and three figures: forward
FLOPs, the matmul part of them, and the *real* backward FLOPs of frozen-base LoRA training (see
"Backward" below). The report sums them by module, by component and by layer.

Conventions (primitives in ``flops/primitives.py``):
  * Attention is priced over the full T x S score rectangle, the way SDPA's math path and the
    memory-efficient kernels compute it; the causal mask is the addition of a 0/-inf bias to every
    score (where the model passes one: T > 1, or padding), so it costs B*H*T*S.
  * Grouped-query attention is counted like multi-head attention: every one of the H query heads
    computes its own T x S scores and its own weighted sum. Repeating K/V for the groups is a copy.
  * The 1/sqrt(hd) scaling multiplies the scores (SDPA's documented semantics): B*H*T*S.
    (torch's math kernel instead scales q and k by hd^-1/4 each; ``flops/verify.py`` accounts for it.)
  * Computing cos/sin is free (positional encodings); applying them costs 3.5 hd per head and token.
  * Embedding lookup, views, casts, cat, gather: free.

Backward ("real frozen-base LoRA backprop", ``FlopReport.backward_actual``): the rule prices a
training step as 3 x forward. The real step with a frozen base is cheaper, because no weight
gradient is formed for frozen weights, and no gradient at all flows before the first trainable
parameter. We follow ``requires_grad`` through the graph in execution order and price
  * every matmul's input gradient (dX = dY W) only where the input requires grad, and its weight
    gradient (dW = dY^T X) only where the weight is trainable — both exact matmul formulas;
  * every other operation at 2 x its forward cost where a gradient flows through it (an estimate:
    the rule's backward factor applied op by op), else 0;
  * the loss's gradient as ``qwen_min.loss`` computes it (softmax - onehot, then dh = dlogits @ W).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from flops import primitives as P

MODES = ("forward", "train", "prefill", "decode")


@dataclass
class Term:
    """One priced operation (or a group of identical ones) of one module."""

    module: str            # module path in the model ("" for functional code such as the loss)
    component: str         # embedding, norm, attn_proj, lora, rotary, attention, residual, mlp_proj, ...
    layer: int | None      # block index, None outside the blocks
    what: str              # the operation, in the code's notation
    formula: str           # its price, in the notation above, with the numbers filled in
    forward: int
    matmul: int = 0        # the matmul part of `forward` (m*p*(2n-1) convention)
    matmul_outputs: int = 0  # sum of m*p over those matmuls: 2mnp convention = matmul + matmul_outputs
    backward: int = 0      # real frozen-base backward cost of this term
    backward_matmul: int = 0
    backward_matmul_outputs: int = 0


@dataclass
class FlopReport:
    """What ``flops.count`` returns. ``total`` is what the budget is charged.

    total           forward: one forward pass; train: 3 x forward (the rule); prefill/decode: the
                    forward pass plus choosing the next token (greedy argmax or sampling softmax)
    forward         one forward pass (with the loss when included)
    backward_actual the real frozen-base LoRA backward (see the module docstring)
    train_actual    forward + backward_actual: what a LoRA training step really executes
    matmul          the matmul part of ``forward`` (our m*p*(2n-1) convention)
    matmul_2mnp     the same matmuls in the multiply-add convention 2*m*n*p (FlopCounterMode's)
    by_component, by_layer, by_module: ``total`` broken down (each sums to ``total``)
    """

    mode: str
    batch: int
    seq_len: int
    past_len: int
    include_loss: bool
    total: int
    forward: int
    backward_actual: int
    train_actual: int
    matmul: int
    matmul_2mnp: int
    backward_matmul_2mnp: int
    by_component: dict[str, int]
    by_layer: dict[str, int]
    by_module: dict[str, int]
    terms: list[Term] = field(repr=False, default_factory=list)

    def to_dict(self, *, terms: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if terms:
            d["terms"] = [asdict(t) for t in self.terms]
        else:
            d.pop("terms")
        return d


def _trainable(*params: nn.Parameter | None) -> bool:
    return any(p is not None and p.requires_grad for p in params)


def _is_lora(mod: nn.Module) -> bool:
    return hasattr(mod, "base_layer") and hasattr(mod, "lora_A") and hasattr(mod, "lora_B")


class _Walk:
    """Accumulates terms while following the forward pass; ``rg`` flags track requires_grad."""

    def __init__(self, train: bool) -> None:
        self.train = train
        self.terms: list[Term] = []

    def elementwise(self, module: str, component: str, layer: int | None, what: str, formula: str,
                    flops: int, grad_flows: bool) -> None:
        """A non-matmul operation: backward 2 x forward where a gradient flows through it."""
        bwd = P.BACKWARD_FACTOR * flops if grad_flows else 0
        self.terms.append(Term(module, component, layer, what, formula, flops, backward=bwd))

    def matmul(self, module: str, component: str, layer: int | None, what: str, batch: int, m: int, n: int,
               p: int, *, grad_a: bool, grad_b: bool) -> None:
        """batch x (m x n) @ (n x p). Backward: dA = dC @ B^T (batch*m*n*(2p-1)) if A needs a gradient,
        dB = A^T @ dC (batch*n*p*(2m-1)) if B does."""
        fwd = batch * P.matmul(m, n, p)
        bwd = bwd_out = 0
        if grad_a:
            bwd, bwd_out = bwd + batch * P.matmul(m, p, n), bwd_out + batch * m * n
        if grad_b:
            bwd, bwd_out = bwd + batch * P.matmul(n, m, p), bwd_out + batch * n * p
        self.terms.append(Term(module, component, layer, what, f"{batch}*{m}*{p}*(2*{n}-1)", fwd, fwd,
                               batch * m * p, bwd, bwd, bwd_out))

    # ---- module kinds ------------------------------------------------------------------------

    def linear(self, name: str, mod: nn.Module, N: int, component: str, layer: int | None, rg_in: bool,
               out_rows: int | None = None) -> bool:
        """nn.Linear, y = x @ W^T + b, W [out, in]:  N*out*(2*in - 1)  (+ N*out for the bias).
        LoRALinear, y = base(x) + s * B(A(dropout(x))):  base as above, then
            A: N*r*(2*in - 1),  B: N*out*(2*r - 1),  scale s: N*out,  add: N*out
            (+ dropout in training with p > 0: 2*N*in — multiply by the mask, rescale by 1/(1-p)).
        Returns whether the output requires grad."""
        if _is_lora(mod):
            base = mod.base_layer
            rg_base = self.linear(f"{name}.base_layer", base, N, component, layer, rg_in, out_rows)
            if getattr(mod, "merged", False):
                return rg_base
            A, Bm = mod.lora_A, mod.lora_B
            r, d_in, d_out = A.out_features, A.in_features, Bm.out_features
            drop = getattr(mod.lora_dropout, "p", 0.0)
            if self.train and drop > 0:
                self.elementwise(f"{name}.lora_dropout", "lora", layer, "dropout(x)", f"2*{N}*{d_in}",
                                 2 * N * d_in, rg_in)
            self.matmul(f"{name}.lora_A", "lora", layer, "x @ A^T", 1, N, d_in, r,
                        grad_a=rg_in, grad_b=_trainable(A.weight))
            rg_a = rg_in or _trainable(A.weight)
            self.matmul(f"{name}.lora_B", "lora", layer, "A(x) @ B^T", 1, N, r, d_out,
                        grad_a=rg_a, grad_b=_trainable(Bm.weight))
            rg_b = rg_a or _trainable(Bm.weight)
            self.elementwise(name, "lora", layer, "scaling * B(A(x))", f"{N}*{d_out}", N * d_out, rg_b)
            self.elementwise(name, "lora", layer, "base(x) + update", f"{N}*{d_out}", N * d_out, rg_b or rg_base)
            return rg_b or rg_base
        assert isinstance(mod, nn.Linear), f"{name}: cannot price a {type(mod).__name__}"
        d_in = mod.in_features
        d_out = out_rows if out_rows is not None else mod.out_features
        self.matmul(name, component, layer, "x @ W^T", 1, N, d_in, d_out, grad_a=rg_in, grad_b=_trainable(mod.weight))
        rg = rg_in or _trainable(mod.weight, mod.bias)
        if mod.bias is not None:
            self.elementwise(name, component, layer, "+ b", f"{N}*{d_out}", N * d_out, rg)
            if _trainable(mod.bias):  # db = sum of dY over the N rows
                self.terms[-1].backward += d_out * P.reduce_sum(N)
        return rg

    def rms_norm(self, name: str, mod: nn.Module, N: int, layer: int | None, rg_in: bool) -> bool:
        """RMSNorm over D, y = g * x * rsqrt(mean(x^2) + eps), per row:
            x^2: D,  mean: (D-1) + 1,  + eps: 1,  rsqrt = sqrt + inverse: 11,  x * rsqrt: D,  g * .: D
            ->  N * (4*D + 12)."""
        D = mod.weight.shape[0]
        rg = rg_in or _trainable(mod.weight)
        self.elementwise(name, "norm", layer, "g * x * rsqrt(mean(x^2) + eps)", f"{N}*(4*{D}+12)",
                         N * P.rms_norm(D), rg)
        return rg

    def attention(self, name: str, attn: nn.Module, B: int, T: int, S: int, layer: int, rg_x: bool,
                  masked: bool) -> bool:
        """Attention.forward: q, k, v projections; rotary on q and k; SDPA; o_proj.

        rotary, x*cos + rotate_half(x)*sin per head and token: hd mul + hd/2 neg + hd mul + hd add
            = 3.5*hd;  q: B*H*T*3.5*hd,  k: B*Hkv*T*3.5*hd
        scores   q @ k^T          B*H * T*S*(2*hd - 1)
        scale    * 1/sqrt(hd)     B*H*T*S
        mask     + (0 | -inf)     B*H*T*S  (only where a mask is applied: T > 1 or padding)
        softmax  over S           B*H*T * (14*S - 2)
        weighted sum  p @ v       B*H * T*hd*(2*S - 1)
        """
        H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
        N = B * T
        rg_q = self.linear(f"{name}.q_proj", attn.q_proj, N, "attn_proj", layer, rg_x)
        rg_k = self.linear(f"{name}.k_proj", attn.k_proj, N, "attn_proj", layer, rg_x)
        rg_v = self.linear(f"{name}.v_proj", attn.v_proj, N, "attn_proj", layer, rg_x)
        rot = hd * P.MUL + hd // 2 * P.NEG + hd * P.MUL + hd * P.ADD
        self.elementwise(name, "rotary", layer, "q*cos + rotate_half(q)*sin", f"{B}*{H}*{T}*3.5*{hd}",
                         B * H * T * rot, rg_q)
        self.elementwise(name, "rotary", layer, "k*cos + rotate_half(k)*sin", f"{B}*{Hkv}*{T}*3.5*{hd}",
                         B * Hkv * T * rot, rg_k)
        rg_p = rg_q or rg_k
        self.matmul(name, "attention", layer, "scores = q @ k^T", B * H, T, hd, S, grad_a=rg_q, grad_b=rg_k)
        if rg_k and Hkv < H:  # the gradient of the repeated keys is summed over each group
            self.terms[-1].backward += B * (H - Hkv) * S * hd
        self.elementwise(name, "attention", layer, "scores * 1/sqrt(hd)", f"{B}*{H}*{T}*{S}", B * H * T * S, rg_p)
        if masked:
            self.elementwise(name, "attention", layer, "scores + mask", f"{B}*{H}*{T}*{S}", B * H * T * S, rg_p)
        self.elementwise(name, "attention", layer, "softmax(scores)", f"{B}*{H}*{T}*(14*{S}-2)",
                         B * H * T * P.softmax(S), rg_p)
        self.matmul(name, "attention", layer, "y = p @ v", B * H, T, S, hd, grad_a=rg_p, grad_b=rg_v)
        if rg_v and Hkv < H:
            self.terms[-1].backward += B * (H - Hkv) * S * hd
        rg_y = rg_p or rg_v
        return self.linear(f"{name}.o_proj", attn.o_proj, N, "attn_proj", layer, rg_y)

    def mlp(self, name: str, mlp: nn.Module, N: int, layer: int, rg_x: bool) -> bool:
        """MLP, down(silu(gate(x)) * up(x)):
            gate, up: N*F*(2*D - 1) each;  silu(z) = z / (1 + e^-z): neg, exp, +1, inverse, mul = 14 per
            element: N*F*14;  * up: N*F;  down: N*D*(2*F - 1)."""
        F_ = mlp.gate_proj.out_features
        rg_g = self.linear(f"{name}.gate_proj", mlp.gate_proj, N, "mlp_proj", layer, rg_x)
        rg_u = self.linear(f"{name}.up_proj", mlp.up_proj, N, "mlp_proj", layer, rg_x)
        self.elementwise(name, "mlp_act", layer, "silu(gate)", f"{N}*{F_}*14", N * F_ * P.SILU, rg_g)
        self.elementwise(name, "mlp_act", layer, "silu(gate) * up", f"{N}*{F_}", N * F_ * P.MUL, rg_g or rg_u)
        return self.linear(f"{name}.down_proj", mlp.down_proj, N, "mlp_proj", layer, rg_g or rg_u)


def count(model: nn.Module, *, batch: int, seq_len: int, mode: str = "forward", past_len: int = 0,
          include_loss: bool | None = None, scored_tokens: int | None = None, vocab: int | None = None,
          sampling: bool = False, padded: bool = False) -> FlopReport:
    """Price one call of the model (see the module docstring for the conventions).

    mode      forward: ``model(ids)`` over B x T tokens, logits for every position (or, with the loss,
                       ``chunked_cross_entropy(model.hidden(ids), ...)`` — logits only for scored tokens);
              train:   a training step on that forward-with-loss, total = 3 x forward (the rule);
                       ``backward_actual``/``train_actual`` give the real frozen-base cost;
              prefill: the prompt's forward in ``generate``: hidden states for all T tokens, logits for
                       the last one per row, then choosing the next token;
              decode:  one KV-cached step: T (usually 1) new tokens attending to P = past_len cached
                       positions, logits for the last one, choosing the next token.
    include_loss  default True for forward and train, False for prefill and decode.
    scored_tokens rows with a label (not -100); default all B*T. Only they reach the output layer in
                  the loss, as in ``chunked_cross_entropy``.
    vocab     rows of the output layer actually computed (constrained decoding); default all.
    sampling  prefill/decode: sample (temperature divide V + softmax over V per row) instead of the
              greedy argmax (V - 1 comparisons per row).
    padded    an attention mask with padding is passed, so the mask is applied even when T == 1.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch < 1 or seq_len < 1 or past_len < 0:
        raise ValueError(f"need batch >= 1, seq_len >= 1, past_len >= 0; got {batch}, {seq_len}, {past_len}")
    if include_loss is None:
        include_loss = mode in ("forward", "train")
    if include_loss and mode in ("prefill", "decode"):
        raise ValueError(f"mode {mode!r} has no loss")
    B, T, S = batch, seq_len, past_len + seq_len
    N = B * T
    train = mode == "train"
    w = _Walk(train)

    # embedding: a lookup, free; its backward (a scatter-add of N rows of D) only if it is trained
    emb = model.embed_tokens
    D = emb.weight.shape[1]
    rg = _trainable(emb.weight)
    w.terms.append(Term("embed_tokens", "embedding", None, "embed_tokens[ids] (lookup)", "0", 0,
                        backward=N * D if rg else 0))
    w.terms.append(Term("rotary", "rotary", None, "cos, sin of positions (positional encodings are free)", "0", 0))

    masked = T > 1 or padded
    for i, block in enumerate(model.layers):
        name = f"layers.{i}"
        rg_n = w.rms_norm(f"{name}.input_layernorm", block.input_layernorm, N, i, rg)
        rg_a = w.attention(f"{name}.self_attn", block.self_attn, B, T, S, i, rg_n, masked)
        rg = rg or rg_a
        w.elementwise(name, "residual", i, "h = x + attn", f"{N}*{D}", N * D * P.ADD, rg)
        rg_n = w.rms_norm(f"{name}.post_attention_layernorm", block.post_attention_layernorm, N, i, rg)
        rg_m = w.mlp(f"{name}.mlp", block.mlp, N, i, rg_n)
        rg = rg or rg_m
        w.elementwise(name, "residual", i, "h + mlp", f"{N}*{D}", N * D * P.ADD, rg)
    rg = w.rms_norm("norm", model.norm, N, None, rg)

    # output layer: which rows reach it
    head = model.lm_head
    V = vocab if vocab is not None else head.out_features
    if mode in ("prefill", "decode"):
        R = B
    elif include_loss:
        R = scored_tokens if scored_tokens is not None else N
        if not 0 <= R <= N:
            raise ValueError(f"scored_tokens must be in [0, {N}], got {R}")
    else:
        R = N
    rg = w.linear("lm_head", head, R, "lm_head", None, rg, out_rows=V)
    if include_loss:
        # cross-entropy (qwen_min.loss: summed per chunk into a zero-initialised total, then / count):
        #   log_softmax over V per row: R*(14*V + 8);  negate the label's log-prob: R;  add into the total: R;
        #   mean: 1.
        # Its backward is computed in the loss's forward, chunk by chunk, while the logits exist:
        #   dlogits = softmax(logits) - onehot(y): R*(14*V - 2) + R;  dh = dlogits @ W (priced by the
        #   lm_head term above);  the stored dh scaled by the incoming gradient: R*D.
        w.elementwise("loss", "loss", None, "log_softmax(logits)", f"{R}*(14*{V}+8)", R * P.log_softmax(V), False)
        w.terms[-1].backward = R * P.softmax(V) + R * P.SUB if rg else 0
        w.elementwise("loss", "loss", None, "-logp[label], summed, / count", f"2*{R}+1",
                      R * P.NEG + R * P.ADD + P.DIV, False)
        w.terms[-1].backward = R * D * P.MUL if rg else 0
    if mode in ("prefill", "decode"):
        if sampling:  # logits / temperature, then softmax over the V logits of each row
            w.elementwise("sampling", "sampling", None, "softmax(logits / temperature)",
                          f"{B}*({V} + 14*{V}-2)", B * (V * P.DIV + P.softmax(V)), False)
        else:         # greedy: argmax, V - 1 comparisons per row
            w.elementwise("sampling", "sampling", None, "argmax(logits)", f"{B}*({V}-1)",
                          B * P.reduce_sum(V) * P.CMP, False)

    return _report(w.terms, mode=mode, batch=B, seq_len=T, past_len=past_len, include_loss=include_loss)


def _report(terms: list[Term], *, mode: str, batch: int, seq_len: int, past_len: int,
            include_loss: bool) -> FlopReport:
    forward = sum(t.forward for t in terms)
    backward = sum(t.backward for t in terms)
    factor = 1 + P.BACKWARD_FACTOR if mode == "train" else 1
    by_component: dict[str, int] = defaultdict(int)
    by_layer: dict[str, int] = defaultdict(int)
    by_module: dict[str, int] = defaultdict(int)
    for t in terms:
        by_component[t.component] += factor * t.forward
        by_layer["embed" if t.layer is None and t.module in ("embed_tokens", "rotary") else
                 "head" if t.layer is None else str(t.layer)] += factor * t.forward
        by_module[t.module] += factor * t.forward
    matmul = sum(t.matmul for t in terms)
    return FlopReport(
        mode=mode, batch=batch, seq_len=seq_len, past_len=past_len, include_loss=include_loss,
        total=factor * forward, forward=forward, backward_actual=backward, train_actual=forward + backward,
        matmul=matmul, matmul_2mnp=matmul + sum(t.matmul_outputs for t in terms),
        backward_matmul_2mnp=sum(t.backward_matmul + t.backward_matmul_outputs for t in terms),
        by_component=dict(by_component), by_layer=dict(by_layer), by_module=dict(by_module), terms=terms)


def format_report(report: FlopReport) -> str:
    """A human-readable table: totals, then the breakdown by component and by layer."""
    lines = [f"mode={report.mode} batch={report.batch} seq_len={report.seq_len} past_len={report.past_len} "
             f"loss={report.include_loss}",
             f"total          {report.total:.6e}",
             f"forward        {report.forward:.6e}  (matmul {report.matmul:.6e})"]
    if report.mode == "train":
        lines.append(f"train_actual   {report.train_actual:.6e}  (forward + real frozen-base backward "
                     f"{report.backward_actual:.6e})")
    lines.append("by component:")
    for k, v in sorted(report.by_component.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {k:12s} {v:.6e}  {v / report.total if report.total else 0:7.2%}")
    lines.append("by layer:")
    for k, v in report.by_layer.items():
        lines.append(f"  {k:12s} {v:.6e}  {v / report.total if report.total else 0:7.2%}")
    return "\n".join(lines)


__all__ = ["MODES", "FlopReport", "Term", "count", "format_report"]
