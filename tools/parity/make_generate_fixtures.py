#!/usr/bin/env python3
"""Greedy-generation parity fixtures for tessera's KV-cache decoding (tests/generate.rs).

A tiny random Qwen2_5_VLForConditionalGeneration (f32, eager attention) whose weights are
drawn wider than transformers' default init, so that greedy decoding does not collapse onto
one repeated token (with the default std 0.02 the logits are nearly flat and every row repeats
its last token). transformers' own `generate(do_sample=False)` then continues two batches:

- `image`: three left-padded rows, two with an image (grids [1,4,4] and [1,4,6]) and one
  text-only, images placed mid-prompt so the rows' rope deltas differ from zero and from each
  other;
- `text`: two left-padded text-only rows.

Writes tests/fixtures/generate/:
  model/config.json + model/model.safetensors (official tensor names, untied lm_head: with
  tied embeddings and order-one weights every token's own embedding wins the next argmax)
  <case>.safetensors: input_ids I64 [B,T] (left padded), attention_mask I64 [B,T],
  pixel_values F32 [N,1176] + image_grid_thw I64 [I,3] (image case), expected I64 [B,N_NEW]
  (the new tokens), min_gap F32 [B,N_NEW] (top-1 minus top-2 logit at each step: how far
  every greedy choice is from a tie).

No stop token can occur (the config has no eos), so every row runs to
max_new_tokens. Deterministic; run from the repository root:

    pip install torch transformers safetensors
    python3 tools/parity/make_generate_fixtures.py
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

IMG, VID, VS, VE, PAD = 300, 301, 302, 303, 0
N_NEW = 12


def build():
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=320, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}, rope_theta=1e6,
            # No eos: generation never stops early (padding is given to generate explicitly).
            eos_token_id=None, pad_token_id=None, bos_token_id=None),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=48,
                           window_size=56, fullatt_block_indexes=[1], patch_size=14, temporal_patch_size=2,
                           spatial_merge_size=2, in_chans=3, tokens_per_second=2),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
        tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                # Fan-in scaled weights: activations of order one, logits well separated.
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                std = 1.0 if "embed_tokens" in name else fan_in ** -0.5
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def official(name):
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def pad_left(rows):
    T = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def run_case(model, rows, grids, g):
    ids, mask = pad_left(rows)
    kwargs = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMG).int())
    if grids:
        n = sum(a * b * c for a, b, c in grids)
        kwargs["pixel_values"] = torch.randn(n, 3 * 2 * 14 * 14, generator=g)
        kwargs["image_grid_thw"] = torch.tensor(grids)
    out = model.generate(**kwargs, do_sample=False, max_new_tokens=N_NEW, pad_token_id=PAD,
                         output_scores=True, return_dict_in_generate=True)
    new = out.sequences[:, ids.shape[1]:]
    scores = torch.stack(out.scores, dim=1)  # [B, N_NEW, V]
    top2 = scores.topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).float()
    tensors = {k: v.contiguous() for k, v in kwargs.items() if k != "mm_token_type_ids"}
    tensors["expected"] = new.contiguous()
    tensors["min_gap"] = gap.contiguous()
    return tensors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/generate")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = build()
    model_dir = os.path.join(a.out, "model")
    os.makedirs(model_dir, exist_ok=True)
    state = {official(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=1, default=str)

    g = torch.Generator().manual_seed(11)

    def text(n):
        return torch.randint(1, 290, (n,), generator=g).tolist()

    def image(grid):
        return [VS] + [IMG] * (grid[0] * grid[1] * grid[2] // 4) + [VE]

    grids = [[1, 4, 4], [1, 4, 6]]
    cases = {
        "image": (model, [text(3) + image(grids[0]) + text(5),
                          text(2),
                          text(6) + image(grids[1]) + text(8)], grids),
        "text": (model, [text(7), text(13)], []),
    }
    for name, (m, rows, gr) in cases.items():
        with torch.no_grad():
            tensors = run_case(m, rows, gr, g)
        path = os.path.join(a.out, f"{name}.safetensors")
        save_file(tensors, path)
        exp = tensors["expected"]
        print(f"{name}: rows {[len(r) for r in rows]}, min top-1/top-2 gap {tensors['min_gap'].min():.3e}")
        for r in exp.tolist():
            print(f"  {r}  ({len(set(r))} distinct)")
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(a.out) for f in fs)
    print(f"{a.out}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
