#!/usr/bin/env python3
"""The PyTorch + transformers twin of `tessera generate --bench`: greedy `generate` with a KV
cache for a batch of random text prompts (no stop token: every row runs to the end), same
config, batch, prompt length, new tokens and thread count; tokens/s = batch x new tokens /
wall time (prefill included). With --tessera the script writes random weights with
`tessera init`, loads the same weights into transformers, runs tessera's benchmark and prints
the ratio (DESIGN.md target for rollouts: >= 2x transformers).

    pip install torch transformers
    python3 tools/bench/generate_torch.py --model models/bench-tiny --batch 8 --new-tokens 64 \
        --threads 2 --tessera target/release/tessera
"""
import argparse
import atexit
import json
import os
import statistics
import shutil
import subprocess
import tempfile
import time

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/bench-tiny", help="directory with config.json")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--attn", default="sdpa", help="transformers attention implementation")
    ap.add_argument("--tessera", default=None, help="path of the tessera binary to compare with")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    weights_dir = None
    if a.tessera:
        weights_dir = tempfile.mkdtemp(prefix="tessera_generate_bench_")
        atexit.register(shutil.rmtree, weights_dir, True)
        subprocess.run([a.tessera, "init", "--config", os.path.join(a.model, "config.json"),
                        "--out", weights_dir], check=True, capture_output=True)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(weights_dir, attn_implementation=a.attn)
    else:
        cfg = Qwen2_5_VLConfig(**json.load(open(os.path.join(a.model, "config.json"))))
        cfg._attn_implementation = a.attn
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model = model.float().eval()
    # Ordinary tokens, as `tessera generate --bench` draws them: among the first 2000 ids, without
    # the config's image/video/vision markers (ids 3..6 in the tiny preset).
    c = model.config
    special = {c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id}
    ordinary = torch.tensor([t for t in range(1, min(c.text_config.vocab_size, 2000)) if t not in special])
    ids = ordinary[torch.randint(0, len(ordinary), (a.batch, a.prompt_len))]
    mask = torch.ones_like(ids)

    def run():
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=torch.zeros_like(ids),
                                 do_sample=False, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                 eos_token_id=None, pad_token_id=0)
        dt = time.perf_counter() - t
        assert out.shape == (a.batch, a.prompt_len + a.new_tokens), out.shape
        return dt

    run()
    secs = statistics.median(run() for _ in range(a.runs))
    torch_tps = a.batch * a.new_tokens / secs
    print(f"PyTorch {torch.__version__} / transformers generate ({a.attn}, cpu, f32): batch {a.batch}, "
          f"prompt {a.prompt_len}, {a.new_tokens} new tokens: {secs:.3f} s, {torch_tps:.0f} tokens/s, "
          f"{a.threads} threads")
    if a.tessera:
        out = subprocess.run([a.tessera, "--threads", str(a.threads), "generate", "--model", weights_dir,
                              "--bench", str(a.batch), "--bench-prompt-len", str(a.prompt_len),
                              "--max-new-tokens", str(a.new_tokens)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"tessera generate: {r['seconds_median']:.3f} s, {r['tokens_per_s']:.0f} tokens/s")
        print(f"tessera tokens/s / PyTorch tokens/s = {r['tokens_per_s'] / torch_tps:.2f} (target >= 2.0)")


if __name__ == "__main__":
    main()
