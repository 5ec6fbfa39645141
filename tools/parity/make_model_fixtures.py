#!/usr/bin/env python3
"""Parity fixtures for tessera's Qwen2.5-VL: tiny random models built by transformers (f32,
eager attention), a batch with several images of different grids and left padding, and the
logits, loss and every parameter's gradient transformers computes for it.

    pip install torch transformers safetensors
    python3 tools/parity/make_model_fixtures.py [--out tests/fixtures/qwen_parity]

Each case is a folder: config.json + model.safetensors (the model), inputs.safetensors
(input_ids, attention_mask, pixel_values, image_grid_thw, labels) and expected.safetensors
(logits, loss, grad.<official name>). Position ids are transformers' own get_rope_index
(what the processor path gives); logits at padding positions are not meaningful (a query
that sees no key) and the test skips them.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

IMG, VID, VS, VE, PAD = 300, 301, 302, 303, 0

CASES = {
    # Tied embeddings, GQA 4/2, window 112 (4 merged units), one full-attention block.
    "tied_gqa": dict(
        text=dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                    window_size=112, fullatt_block_indexes=[1]),
        tie=True, naming="official", images=True),
    # Untied lm_head, no GQA (3/3), window 56 (2 units), full attention first, other mrope split;
    # saved under the transformers >= 4.52 names (model.language_model.*, model.visual.*).
    "untied_mha_hf_names": dict(
        text=dict(vocab_size=310, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=3, num_key_value_heads=3, mrope_section=[4, 2, 2]),
        vision=dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=4, out_hidden_size=48,
                    window_size=56, fullatt_block_indexes=[0]),
        tie=False, naming="hf5", images=True),
    # GQA 4/1, text only, left padding.
    "text_only_gqa4": dict(
        text=dict(vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, mrope_section=[3, 3, 2]),
        vision=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=1, out_hidden_size=64,
                    window_size=112, fullatt_block_indexes=[0]),
        tie=True, naming="official", images=False),
}

GRIDS = [[1, 8, 12], [1, 4, 4], [1, 6, 4]]  # 24, 4 and 6 image tokens


def build(case):
    t, v = case["text"], case["vision"]
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
            num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t["num_key_value_heads"], rms_norm_eps=1e-6,
            rope_scaling={"type": "mrope", "mrope_section": t["mrope_section"]}, rope_theta=1e6),
        vision_config=dict(depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                           num_heads=v["num_heads"], out_hidden_size=v["out_hidden_size"], window_size=v["window_size"],
                           fullatt_block_indexes=v["fullatt_block_indexes"], patch_size=14, temporal_patch_size=2,
                           spatial_merge_size=2, in_chans=3, tokens_per_second=2),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
        tie_word_embeddings=case["tie"])
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    # Non-trivial norms and biases (the defaults are ones and zeros).
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def batch(case, vocab, g):
    def text(n):
        return torch.randint(1, 290, (n,), generator=g).tolist()

    def image(grid):
        return [VS] + [IMG] * (grid[0] * grid[1] * grid[2] // 4) + [VE]

    if case["images"]:
        rows = [text(3) + image(GRIDS[0]) + text(4) + image(GRIDS[1]) + text(2),
                text(5) + image(GRIDS[2]) + text(9)]
    else:
        rows = [text(11), text(17)]
    T = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[ids == IMG] = -100
    labels[:, : 2 + (T - min(len(r) for r in rows))] = -100  # a prompt that is not scored
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if case["images"]:
        n = sum(a * b * c for a, b, c in GRIDS)
        inputs["pixel_values"] = torch.randn(n, 3 * 2 * 14 * 14, generator=g)
        inputs["image_grid_thw"] = torch.tensor(GRIDS)
    return inputs


def official(name):
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def hf5(name):
    name = official(name)
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/qwen_parity")
    a = ap.parse_args()
    torch.manual_seed(0)
    for name, case in CASES.items():
        out = os.path.join(a.out, name)
        os.makedirs(out, exist_ok=True)
        model = build(case)
        g = torch.Generator().manual_seed(11)
        inputs = batch(case, case["text"]["vocab_size"], g)
        mm = (inputs["input_ids"] == IMG).int()
        pos, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=mm,
                                            image_grid_thw=inputs.get("image_grid_thw"),
                                            attention_mask=inputs["attention_mask"])
        res = model(**inputs, position_ids=pos, mm_token_type_ids=mm)
        res.loss.backward()
        rename = official if case["naming"] == "official" else hf5
        state = {rename(k): v.detach().contiguous() for k, v in model.state_dict().items()}
        if case["tie"]:
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1, default=str)
        save_file({k: v.contiguous() for k, v in inputs.items()}, os.path.join(out, "inputs.safetensors"))
        expected = {"logits": res.logits.detach().float().contiguous(), "loss": res.loss.detach().reshape(())}
        for k, p in model.named_parameters():
            if p.grad is not None:
                expected["grad." + official(k)] = p.grad.detach().contiguous()
        save_file(expected, os.path.join(out, "expected.safetensors"))
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{name}: loss {res.loss.item():.6f}, logits {tuple(res.logits.shape)}, {len(expected) - 2} grads, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
