#!/usr/bin/env python3
"""Puts tessera's CPU kernels beside PyTorch CPU on the same machine, same thread count.

Runs `tessera bench <what> --json` and the PyTorch equivalent alternately (ROUNDS times
each, so a noisy neighbour hits both alike), takes the median per shape, and prints the
ratio tessera / PyTorch in throughput (>1 means tessera is faster).

    python3 tools/bench/cpu_vs_torch.py [--threads 2] [--rounds 5] [--binary target/release/tessera]

Needs `pip install torch`. Never needed to build or test tessera.
"""
import argparse
import json
import statistics
import subprocess
import time

import torch

SIZES = ["512", "1024", "2048", "4096x2048x256", "4096x2048x11008"]


def parse(s):
    d = [int(x) for x in s.split("x")]
    return (d[0], d[0], d[0]) if len(d) == 1 else tuple(d)


def torch_matmul_gflops(m, k, n, budget=1.0):
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    t0 = time.perf_counter()
    a @ b
    once = max(time.perf_counter() - t0, 1e-6)
    reps = min(max(int(budget / once), 3), 200)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(ts) / 1e9


def tessera_matmul_gflops(binary, threads, sizes):
    out = subprocess.run(
        [binary, "--threads", str(threads), "bench", "matmul", "--json", "--sizes", ",".join(sizes)],
        check=True, capture_output=True, text=True).stdout
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    return {(r["m"], r["k"], r["n"]): r["gflops"] for r in rows}


def torch_ops():
    """The PyTorch twins of `tessera bench ops` (same shapes, f32, backward from sum)."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    tgt = torch.tensor([(i * 7919) % 8192 for i in range(2048)])
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    if hasattr(F, "rms_norm"):
        rms = lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6)
    return {
        "rms_norm": ([r(4096, 1024), r(1024)], rms),
        "softmax": ([r(4096, 1024)], lambda x: torch.softmax(x, -1)),
        "cross_entropy": ([r(2048, 8192)], lambda x: F.cross_entropy(x, tgt, ignore_index=-100)),
        "attention": ([r(2, 8, 512, 64), r(2, 8, 512, 64), r(2, 8, 512, 64)],
                      lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "swiglu": ([r(4096, 2816), r(4096, 2816)], lambda a, b: F.silu(a) * b),
    }


def time_median(f, budget=1.0):
    f()
    t0 = time.perf_counter()
    f()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = min(max(int(budget / once), 3), 200)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def torch_op_ms(inputs, f):
    with torch.no_grad():
        fwd = time_median(lambda: f(*inputs))
    leaves = [x.clone().requires_grad_() for x in inputs]

    def step():
        f(*leaves).sum().backward()
        for l in leaves:
            l.grad = None
    return fwd * 1e3, time_median(step) * 1e3


def compare_ops(a):
    cases = torch_ops()
    ours, theirs = {}, {}
    for _ in range(a.rounds):
        out = subprocess.run([a.binary, "--threads", str(a.threads), "bench", "ops", "--json"],
                             check=True, capture_output=True, text=True).stdout
        for r in (json.loads(l) for l in out.splitlines() if l.startswith("{")):
            ours.setdefault(r["op"], []).append((r["fwd_ms"], r["fwd_bwd_ms"], r["shape"]))
        for name, (inputs, f) in cases.items():
            theirs.setdefault(name, []).append(torch_op_ms(inputs, f))
    print(f"\nfused ops f32, {a.threads} threads, median of {a.rounds} rounds (ratio = PyTorch time / tessera time)")
    print(f"{'op':<14} {'shape':<30} {'fwd ms':>8} {'torch':>8} {'ratio':>6} {'f+b ms':>9} {'torch':>9} {'ratio':>6}")
    for name in cases:
        if name not in ours:
            continue
        f = statistics.median(x[0] for x in ours[name])
        b = statistics.median(x[1] for x in ours[name])
        tf = statistics.median(x[0] for x in theirs[name])
        tb = statistics.median(x[1] for x in theirs[name])
        print(f"{name:<14} {ours[name][0][2]:<30} {f:>8.2f} {tf:>8.2f} {tf / f:>6.2f} {b:>9.2f} {tb:>9.2f} {tb / b:>6.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--binary", default="target/release/tessera")
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--what", default="matmul,ops", help="matmul, ops, or both")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if "ops" in a.what:
        compare_ops(a)
    if "matmul" not in a.what:
        return
    sizes = a.sizes.split(",")
    ours = {parse(s): [] for s in sizes}
    theirs = {parse(s): [] for s in sizes}
    for _ in range(a.rounds):
        for shape, g in tessera_matmul_gflops(a.binary, a.threads, sizes).items():
            ours[shape].append(g)
        for s in sizes:
            theirs[parse(s)].append(torch_matmul_gflops(*parse(s)))
    print(f"f32 matmul, {a.threads} threads, median of {a.rounds} alternating rounds; torch {torch.__version__}")
    print(f"{'M x K x N':>22} {'tessera GFLOP/s':>16} {'PyTorch GFLOP/s':>16} {'ratio':>7}")
    for s in sizes:
        sh = parse(s)
        t, p = statistics.median(ours[sh]), statistics.median(theirs[sh])
        print(f"{'x'.join(map(str, sh)):>22} {t:>16.1f} {p:>16.1f} {t / p:>7.2f}")


if __name__ == "__main__":
    main()
