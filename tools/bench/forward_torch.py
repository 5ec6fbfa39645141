#!/usr/bin/env python3
"""The PyTorch + transformers twin of `tessera bench forward`: one no-grad forward (with the
loss) of a Qwen2.5-VL model directory, same batch shape (one image per sample, then random
text), same thread count, f32 on the CPU. With --tessera it runs tessera's binary on the same
directory first (so the two never hold the weights at once) and prints the ratio.

    tessera init --config models/qwen2.5-vl-3b/config.json --out /tmp/q3b --dtype bf16
    python3 tools/bench/forward_torch.py --model /tmp/q3b --seq 300 --image 448,448 \\
        --threads 2 --tessera target/release/tessera

Needs `pip install torch transformers` and memory for the f32 weights (15 GB for the 3B).
"""
import argparse
import json
import resource
import subprocess
import time

import torch
from transformers import Qwen2_5_VLForConditionalGeneration


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="model directory (config.json + safetensors)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=300)
    ap.add_argument("--image", default="448,448")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--tessera", default=None, help="path of the tessera binary to compare with")
    a = ap.parse_args()

    ours = None
    if a.tessera:
        out = subprocess.run([a.tessera, "--threads", str(a.threads), "bench", "forward", "--model", a.model,
                              "--batch", str(a.batch), "--seq", str(a.seq), "--image", a.image],
                             check=True, capture_output=True, text=True).stdout
        ours = json.loads(out.strip().splitlines()[-1])
        print(f"tessera: load {ours['load_s']:.1f} s, forward {ours['forward_s']:.2f} s, "
              f"loss {ours['loss']:.4f}, peak {ours['peak_rss_gib']:.2f} GiB")

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        a.model, dtype=torch.float32, attn_implementation=a.attn).eval()
    load_s = time.perf_counter() - t0
    cfg = model.config
    v = cfg.vision_config
    h, w = (int(x) for x in a.image.split(","))
    gh, gw = h // v.patch_size, w // v.patch_size
    n_img = gh * gw // (v.spatial_merge_size ** 2)
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    vocab = cfg.text_config.vocab_size
    ids = []
    for _ in range(a.batch):
        row = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
        while len(row) < a.seq:
            t = int(torch.randint(0, vocab, (1,)))
            if t not in special:
                row.append(t)
        ids.append(row)
    input_ids = torch.tensor(ids)
    labels = input_ids.clone()
    for s in special:
        labels[labels == s] = -100
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    pixel_values = torch.randn(a.batch * gh * gw, patch_dim)
    grid = torch.tensor([[1, gh, gw]] * a.batch)
    t1 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid, labels=labels)
    fwd_s = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"PyTorch {torch.__version__} + transformers ({a.attn}, cpu, f32): load {load_s:.1f} s, "
          f"forward {fwd_s:.2f} s, loss {out.loss.item():.4f}, peak {peak:.2f} GiB, {a.threads} threads")
    if ours:
        print(f"tessera forward time / PyTorch forward time = {ours['forward_s'] / fwd_s:.2f}")


if __name__ == "__main__":
    main()
