#!/usr/bin/env python3
"""Writes tests/fixtures/policy_loss/cases.json: the GRPO loss family and group advantages
computed with PyTorch autograd, for tests/policy_loss.rs.

The formulas follow ../shared/reference/study.md ("GRPO as the field implements it", i.e.
TRL's GRPOTrainer._compute_loss and _generate_and_score_completions), written here
independently of the Rust code:

    ratio      = exp(logps - old_logps)
    loss_t     = -min(ratio * A, clamp(ratio, 1 - eps, 1 + eps_high) * A)
    loss_t    += beta * (exp(ref - logps) - (ref - logps) - 1)        (only when beta > 0)
    grpo       = mean_b( sum_t(loss_t * mask) / clamp(sum_t mask, min=1) )
    bnpo, dapo = sum(loss_t * mask) / clamp(sum(mask), min=1)
    dr_grpo    = sum(loss_t * mask) / (B * max_completion_len)

    advantages = (r - mean of its group of G) / (std + 1e-4), std = the group's unbiased std
                 (group), the whole batch's unbiased std (batch); "none" does not divide.

Inputs are random (fixed seed), B=4, T=7, ragged mask; every value is rounded to f32 (the CLI
contract's dtype) and the losses and gradients are computed in float64 from those values.

Run from the repository root (deterministic):

    pip install torch
    python3 tools/parity/make_policy_loss_fixtures.py
"""

import json
import os

import torch

OUT = os.path.join("tests", "fixtures", "policy_loss", "cases.json")
B, T = 4, 7
LENGTHS = [7, 3, 5, 1]


def f32(t):
    """Rounds to f32, computes in f64."""
    return t.to(torch.float32).to(torch.float64)


def per_token(logps, old_logps, ref_logps, adv, beta, eps, eps_high):
    ratio = torch.exp(logps - old_logps)
    a = adv[:, None]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1.0 - eps, 1.0 + eps_high) * a
    loss = -torch.min(unclipped, clipped)
    if beta > 0:
        diff = ref_logps - logps
        loss = loss + beta * (torch.exp(diff) - diff - 1.0)
    return loss


def aggregate(loss, mask, loss_type, max_len):
    masked = loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / (loss.shape[0] * max_len)
    raise ValueError(loss_type)


def group_advantages(rewards, g, scale):
    grouped = rewards.view(-1, g)
    mean = grouped.mean(dim=1).repeat_interleave(g)
    adv = rewards - mean
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(g)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    elif scale == "none":
        return adv
    else:
        raise ValueError(scale)
    return adv / (std + 1e-4)


def main():
    gen = torch.Generator().manual_seed(20240611)
    logps = f32(-torch.rand(B, T, generator=gen, dtype=torch.float64) * 3.0 - 0.05)
    # old/ref differ enough that several ratios leave [0.8, 1.28] on both sides.
    old_logps = f32(logps + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3)
    ref_logps = f32(logps + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.5)
    advantages = f32(torch.tensor([1.3, -0.7, 0.45, -1.6], dtype=torch.float64))
    mask = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1.0

    cases = []
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for beta in (0.0, 0.04):
            for eps_high in (0.2, 0.28):
                for max_len in ((None, 10) if loss_type == "dr_grpo" else (None,)):
                    x = logps.clone().requires_grad_(True)
                    per = per_token(x, old_logps, ref_logps, advantages, beta, 0.2, eps_high)
                    loss = aggregate(per, mask, loss_type, T if max_len is None else max_len)
                    (g,) = torch.autograd.grad(loss, x)
                    name = f"{loss_type}_beta{beta}_epshigh{eps_high}"
                    if max_len is not None:
                        name += f"_maxlen{max_len}"
                    cases.append(
                        {
                            "name": name,
                            "loss_type": loss_type,
                            "beta": beta,
                            "epsilon": 0.2,
                            "epsilon_high": eps_high,
                            "max_completion_len": max_len,
                            "loss": loss.item(),
                            "grad_logps": g.flatten().tolist(),
                        }
                    )

    rewards = f32(torch.tensor([1.0, 0.0, 0.5, 0.25, 0.0, 0.0, 1.0, 0.0, 0.3, 0.9, 0.1, 0.6],
                               dtype=torch.float64))
    adv_cases = []
    for g in (4, 3):
        for scale in ("group", "batch", "none"):
            adv_cases.append(
                {
                    "name": f"G{g}_{scale}",
                    "group_size": g,
                    "scale_rewards": scale,
                    "advantages": group_advantages(rewards, g, scale).tolist(),
                }
            )
    # A group with identical rewards: std 0, advantage 0 (the 1e-4 keeps it finite).
    flat = f32(torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 1.0], dtype=torch.float64))

    out = {
        "generator": "tools/parity/make_policy_loss_fixtures.py",
        "torch": torch.__version__,
        "B": B,
        "T": T,
        "inputs": {
            "logps": logps.flatten().tolist(),
            "old_logps": old_logps.flatten().tolist(),
            "ref_logps": ref_logps.flatten().tolist(),
            "advantages": advantages.tolist(),
            "mask": mask.flatten().tolist(),
        },
        "loss_cases": cases,
        "rewards": rewards.tolist(),
        "advantage_cases": adv_cases,
        "flat_rewards": flat.tolist(),
        "flat_advantages_group": group_advantages(flat, 3, "group").tolist(),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(cases)} loss cases, {len(adv_cases) + 1} advantage cases")


if __name__ == "__main__":
    main()
