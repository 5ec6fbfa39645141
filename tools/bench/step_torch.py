#!/usr/bin/env python3
"""The PyTorch + transformers twin of `tessera bench step`: one full training step (forward,
backward, AdamW) of Qwen2.5-VL with random weights, same config, batch, sequence, image size
and thread count. With --tessera it also runs tessera's binary and prints the ratio.

    pip install torch transformers
    python3 tools/bench/step_torch.py --model models/bench-tiny --batch 8 --seq 64 --image 112,112 \
        --threads 2 --tessera target/release/tessera
"""
import argparse
import gc
import json
import statistics
import subprocess
import time

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/bench-tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--image", default="112,112")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", help="transformers attention implementation")
    ap.add_argument("--tessera", default=None, help="path of the tessera binary to compare with")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="f32", help="f32, or bf16 (autocast over f32 weights, as tessera does)")
    ap.add_argument("--checkpoint", action="store_true",
                    help="activation checkpointing on both sides (transformers' gradient_checkpointing_enable)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(**json.load(open(f"{a.model}/config.json")))
    cfg._attn_implementation = a.attn
    dev = torch.device(a.device)
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().train().to(dev)
    if a.checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    h, w = (int(x) for x in a.image.split(","))
    v = cfg.vision_config
    grid = [1, h // v.patch_size, w // v.patch_size]
    n_img = grid[1] * grid[2] // (v.spatial_merge_size ** 2)
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    rows = []
    for _ in range(a.batch):
        r = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
        while len(r) < a.seq:
            t = int(torch.randint(0, cfg.text_config.vocab_size, ()))
            if t not in special:
                r.append(t)
        rows.append(r)
    ids = torch.tensor(rows, device=dev)
    labels = ids.clone()
    for s in special:
        labels[ids == s] = -100
    pixels = torch.randn(a.batch * grid[1] * grid[2], 3 * 2 * v.patch_size ** 2, device=dev)
    grids = torch.tensor([grid] * a.batch, device=dev)
    mm = (ids == cfg.image_token_id).int()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    extra = {"mm_token_type_ids": mm}

    def forward():
        try:
            return model(input_ids=ids, pixel_values=pixels, image_grid_thw=grids, labels=labels, **extra)
        except TypeError:  # older transformers without mm_token_type_ids
            extra.clear()
            return model(input_ids=ids, pixel_values=pixels, image_grid_thw=grids, labels=labels)

    def step():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            out = forward()
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def pipelined(n):
        """n steps issued back to back, the losses read after the last (as tessera's
        `pipelined_ms`): ms per step."""
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses = []
        for _ in range(n):
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
                out = forward()
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.detach())
        [x.item() for x in losses]
        return (time.perf_counter() - t) / n * 1e3

    n_params = sum(p.numel() for p in model.parameters())
    # Approximate model FLOPs per step: 6 x parameters x tokens (dense bf16 peak 989 TFLOP/s).
    flops = 6 * n_params * a.batch * a.seq
    torch_ms = torch_pipe_ms = None
    try:
        step()
        torch_ms = statistics.median(step() for _ in range(a.steps)) * 1e3
        torch_pipe_ms = pipelined(a.steps) if dev.type == "cuda" else None
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        # The whole 3B model without checkpointing may not fit PyTorch's step; tessera's still
        # runs below (after the memory is freed), without a ratio where PyTorch has no time. Near
        # the limit the error can also come from outside the caching allocator (cuBLAS's
        # workspace: a RuntimeError); any other error is re-raised.
        text = str(e)
        if not isinstance(e, torch.cuda.OutOfMemoryError) and not (
                "out of memory" in text or "ALLOC_FAILED" in text):
            raise
        print(f"PyTorch {torch.__version__} ({a.attn}, {a.device}, {a.dtype}): out of GPU memory "
              f"({str(e).splitlines()[0][:200]})")
    if torch_ms is not None:
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        print(f"PyTorch {torch.__version__} ({a.attn}, {a.device}, {a.dtype}): {torch_ms:.1f} ms/step, "
              f"{a.batch * a.seq / torch_ms * 1e3:.0f} tokens/s, {a.threads} threads, {n_params / 1e6:.0f}M params, "
              f"peak {peak:.1f} GiB, approx MFU {flops / (torch_ms * 1e-3) / 989e12:.1%}")
    if torch_pipe_ms is not None:
        print(f"PyTorch pipelined (steps back to back): {torch_pipe_ms:.1f} ms/step, "
              f"approx MFU {flops / (torch_pipe_ms * 1e-3) / 989e12:.1%}")
    if a.tessera:
        # The GPU's memory back before tessera's process starts (the whole 3B model's weights,
        # gradients and AdamW state would not fit twice on one card).
        del opt, model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        run = subprocess.run([a.tessera, "--threads", str(a.threads), "bench", "step", "--model", a.model,
                              "--batch", str(a.batch), "--seq", str(a.seq), "--image", a.image,
                              "--steps", str(a.steps), "--device", a.device, "--dtype", a.dtype,
                              "--json"] + (["--checkpoint"] if a.checkpoint else []),
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(f"tessera bench step failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
            raise SystemExit(1)
        # bench step's host counters and profile (stderr), then its result.
        host = [l for l in run.stderr.splitlines() if l.startswith("host per step")]
        if host:
            print(f"tessera {host[-1]}")
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"tessera: {r['step_ms_median']:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s, "
              f"peak {r.get('peak_gib', float('nan')):.1f} GiB, "
              f"approx MFU {flops / (r['step_ms_median'] * 1e-3) / 989e12:.1%}, loss {r.get('loss')}")
        if torch_ms is not None:
            print(f"tessera time / PyTorch time = {r['step_ms_median'] / torch_ms:.2f} (target <= 1.0)")
        if r.get("pipelined_ms"):
            ratio = (f"; tessera / PyTorch pipelined = {r['pipelined_ms'] / torch_pipe_ms:.2f}"
                     if torch_pipe_ms else "")
            print(f"tessera pipelined: {r['pipelined_ms']:.1f} ms/step, approx MFU "
                  f"{flops / (r['pipelined_ms'] * 1e-3) / 989e12:.1%}{ratio}")


if __name__ == "__main__":
    main()
