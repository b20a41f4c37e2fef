"""experiments/lib/training/step.py: the training step's loss and gradients are the chunked cross-entropy's
mean over the scored tokens (or over the n_scored given, as a rank's share of a global batch)."""

from __future__ import annotations

import torch

import lora
import qwen_min
from experiments.lib.training.step import next_token_labels, train_step


def _grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return out


def test_train_step_is_the_mean_cross_entropy_backward(tiny_ckpt):
    model = qwen_min.from_pretrained(tiny_ckpt, dtype=torch.float32)
    lora.apply_lora(model, rank=2)
    ids = torch.randint(0, 151643, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = next_token_labels(ids)
    assert torch.equal(labels[:, :-1], ids[:, 1:]) and (labels[:, -1] == -100).all()
    labels[0, :4] = -100  # a prompt that is not scored
    n = int((labels != -100).sum())

    loss_sum = train_step(model.hidden, model.lm_head, ids, labels)
    got = _grads(model)
    mean = qwen_min.chunked_cross_entropy(model.hidden(ids), model.lm_head, labels)
    mean.backward()
    want = _grads(model)
    assert torch.allclose(loss_sum.detach() / n, mean.detach())
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(got, want, strict=True))

    train_step(model.hidden, model.lm_head, ids, labels, n_scored=2 * n)  # half of a global batch's mean
    assert all(torch.allclose(2 * a, b, atol=1e-7) for a, b in zip(_grads(model), got, strict=True))
