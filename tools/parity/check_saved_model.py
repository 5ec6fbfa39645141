#!/usr/bin/env python3
"""Checks that a model directory written by tessera (`tessera init`, checkpoints) loads in
transformers with every tensor used (no missing / unexpected keys) and runs a forward.

    python3 tools/parity/check_saved_model.py DIR
"""
import sys

import torch
from transformers import Qwen2_5_VLForConditionalGeneration


def main(path):
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, output_loading_info=True,
                                                                     dtype=torch.float32)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        sys.exit(f"{path}: loading problems: {bad}")
    cfg = model.config
    ids = torch.tensor([[cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id, 5, 6]])
    pixels = torch.randn(16, 3 * 2 * 14 * 14)
    out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]]),
                mm_token_type_ids=(ids == cfg.image_token_id).int(), labels=ids)
    print(f"{path}: loaded in transformers with every tensor; forward ok, loss {out.loss.item():.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
