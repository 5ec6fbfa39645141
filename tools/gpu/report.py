"""Joins `tessera bench cuda --json` and tools/gpu/torch_baselines.py output into a markdown
table: each kernel's bandwidth as a fraction of the copy, and the PyTorch time beside ours.

    python3 tools/gpu/report.py OUT_DIR   (reads bench_cuda.jsonl, bench_matmul.jsonl, torch.jsonl)
"""
import json
import os
import sys


def load(path):
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def main():
    d = sys.argv[1]
    allours = load(os.path.join(d, "bench_cuda.jsonl"))
    ours = [r for r in allours if "fraction_of_copy" in r]
    torch = load(os.path.join(d, "torch.jsonl"))
    tk = {r["kernel"]: r for r in torch if "kernel" in r}
    print("| kernel | shape | tessera ms | GB/s | of copy | PyTorch ms | PyTorch / tessera |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in ours:
        t = tk.get(r["kernel"])
        tm = f"{t['ms']:.3f}" if t else "-"
        ratio = f"{t['ms'] / r['ms']:.2f}x" if t else "-"
        print(f"| {r['kernel']} | {r['shape']} | {r['ms']:.3f} | {r['gbps']:.0f} | "
              f"{100 * r['fraction_of_copy']:.0f}% | {tm} | {ratio} |")
    mm = load(os.path.join(d, "bench_matmul.jsonl"))
    # The references by layout: PyTorch's A @ B and At.t() @ B (A stored transposed, the weight
    # gradients' layout), and cuBLAS in tessera's own process on the same operands.
    tm = {(r["op"], r["m"], r["k"], r["n"]): r for r in torch if r.get("op") in ("matmul", "matmul_at")}
    cub = {(r["op"], r["m"], r["k"], r["n"]): r for r in mm
           if r.get("op") in ("matmul_cublas", "matmul_cublas_mn_ab")}
    if mm:
        print()
        print("| GEMM m x k x n | tessera kernel | TFLOP/s | PyTorch (cuBLAS) TFLOP/s, same layout | ratio | of cuBLAS in process |")
        print("|---|---|---:|---:|---:|---:|")
        for r in mm:
            at = "_mn_ab" in r["op"]
            key = (r["m"], r["k"], r["n"])
            t = tm.get(("matmul_at" if at else "matmul",) + key)
            tt = f"{t['tflops']:.1f}" if t else "-"
            ratio = f"{r['tflops'] / t['tflops']:.2f}" if t else "-"
            c = cub.get(("matmul_cublas_mn_ab" if at else "matmul_cublas",) + key)
            ratio += f" | {r['tflops'] / c['tflops']:.2f}" if c else " | -"
            kern = {"matmul_tc": "mma.sync gemm.cu (A·Bᵀ)", "matmul_wgmma": "wgmma gemm_sm90.cu (A·Bᵀ)",
                    "matmul_wgmma_ws": "warp-specialised wgmma + TMA (A·Bᵀ)",
                    "matmul_wgmma_ws_ts": "warp-specialised, TMA-store epilogue (A·Bᵀ)",
                    "matmul_wgmma_ws_nostore": "warp-specialised, stores skipped (the mainloop's ceiling)",
                    "matmul_mn_b": "Tensor::matmul, MN-major B read as stored",
                    "matmul_mn_ab": "Tensor::matmul of Aᵀ-stored A, both MN-major",
                    "matmul_bn_old": "Tensor::matmul, tile width by the old rule (TESSERA_GEMM_BN=0)",
                    "matmul_mn_ab_bn_old": "Aᵀ-stored A, both MN-major, tile width by the old rule",
                    "matmul_cublas": "cuBLAS through tessera (cublasGemmEx, --gemm cublas)",
                    "matmul_cublas_mn_ab": "cuBLAS through tessera, Aᵀ-stored A"}.get(
                r["op"], "Tensor::matmul")
            if "bn" in r:
                kern += f" ({r['bn']} wide; the model's {r['bn_model']})"
            print(f"| {r['m']}x{r['k']}x{r['n']} ({r['dtype']}) | {kern} | {r['tflops']:.1f} | {tt} | {ratio} |")
    for op, title in [("attention", "forward"), ("attention_fwd_bwd", "forward + backward"),
                      ("attention_bwd", "backward"),
                      ("attention_bwd_gqa", "backward, 16 query heads on 2 kv heads (no SDPA row)")]:
        att = [r for r in torch if r.get("op") == op]
        ours_att = [r for r in allours if r.get("op") == op]
        if not (att or ours_att):
            continue
        print()
        print(f"| attention {title}, causal, bf16: b,h,t,d | implementation | ms | TFLOP/s | of SDPA |")
        print("|---|---|---:|---:|---:|")
        sd = {(r["b"], r["h"], r["t"], r["d"]): r for r in att}
        for r in att:
            print(f"| {r['b']},{r['h']},{r['t']},{r['d']} | PyTorch SDPA | {r['ms']:.3f} | {r['tflops']:.1f} | 100% |")
        for r in ours_att:
            ref = sd.get((r["b"], r["h"], r["t"], r["d"]))
            frac = f"{100 * ref['ms'] / r['ms']:.0f}%" if ref else "-"
            print(f"| {r['b']},{r['h']},{r['t']},{r['d']} | tessera {r['kernel']} | {r['ms']:.3f} | {r['tflops']:.1f} | {frac} |")
    vis = [r for r in torch + allours if r.get("op") == "attention_vision"]
    if vis:
        print()
        print("| vision attention (16 heads of 80, 4096 patches, non-causal) | pass | implementation | ms | TFLOP/s | of SDPA |")
        print("|---|---|---|---:|---:|---:|")
        sd = {(r["case"], r["pass"]): r for r in vis if r.get("device") == "torch"}
        for r in vis:
            ref = sd.get((r["case"], r["pass"]))
            frac = f"{100 * ref['ms'] / r['ms']:.0f}%" if ref else "-"
            who = "PyTorch SDPA, batched" if r.get("device") == "torch" else f"tessera {r['kernel']}"
            print(f"| {r['case']} | {r['pass']} | {who} | {r['ms']:.3f} | {r['tflops']:.1f} | {frac} |")
    steps(d)
    products(d)


# One line of `bench step`'s profiled table of products by shape: the kernel and its part
# ("gemm_ws_ts [text mlp, backward]"), the shape ("m x k x n", or "batch x m x k x n"), launches
# per step, ms per step and TFLOP/s.
PRODUCT = r"^(.*?)\s+((?:\d+ x )?\d+x\d+x\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$"


def product_times(path):
    """{(part, shape): (launches, ms)} from a profiled step's products-by-shape table, summed
    over the kernels that ran each (a part's forward and backward are different parts)."""
    import re
    out = {}
    if not os.path.exists(path):
        return out
    on = False
    for line in open(path, errors="replace"):
        line = line.rstrip()
        if line.startswith("the products by shape"):
            on = True
            continue
        if not on:
            continue
        m = re.match(PRODUCT, line)
        if not m:
            if out:
                break
            continue
        name, shape, n, ms = m.group(1), m.group(2), int(m.group(3)), float(m.group(4))
        part = name.split(" [", 1)[1].rstrip("]") if " [" in name else "(no part)"
        a, b = out.get((part, shape), (0, 0.0))
        out[(part, shape)] = (a + n, b + ms)
    return out


def products(d):
    """The default step's products beside the same products through cuBLAS (profile.txt and
    profile-cublas.txt of check.sh), shape by shape: where the GEMM's time differs from the
    reference's in the step itself."""
    ours = product_times(os.path.join(d, "profile.txt"))
    ref = product_times(os.path.join(d, "profile-cublas.txt"))
    both = [k for k in ours if k in ref]
    if not both:
        return
    both.sort(key=lambda k: -(ours[k][1] - ref[k][1]))
    print()
    print("| 3B step's products by shape: part | m x k x n | a step | tessera ms | cuBLAS ms | tessera / cuBLAS time |")
    print("|---|---|---:|---:|---:|---:|")
    def ratio(t, c):
        return f"{t / c:.2f}" if c > 0 else "-"
    for k in both:
        (n, t), (_, c) = ours[k], ref[k]
        print(f"| {k[0]} | {k[1]} | {n} | {t:.3f} | {c:.3f} | {ratio(t, c)} |")
    t_all, c_all = sum(ours[k][1] for k in both), sum(ref[k][1] for k in both)
    only = sorted(set(ours) ^ set(ref))
    print(f"| all {len(both)} shapes in both | | | {t_all:.2f} | {c_all:.2f} | {ratio(t_all, c_all)} |")
    if only:
        print(f"\n({len(only)} part/shape pairs appear in one profile only: "
              + ", ".join(f"{p} {s}" for p, s in only[:8]) + (" ..." if len(only) > 8 else "") + ")")


def steps(d):
    """The 3B training steps check.sh ran with `bench step --json` under different switches
    (step-combo*.json with the switches in step-combo*.label, step-unfused.json, step-f32grads.json,
    step-gemm-*.json): one row each."""
    import glob
    import re
    rows = []
    for path in sorted(glob.glob(os.path.join(d, "step-*.json"))):
        name = os.path.basename(path)[len("step-"):-len(".json")]
        r = load(path)
        r = [x for x in r if "step_ms_median" in x]
        m = re.fullmatch(r"mn(\d)-fwg(\d)", name)
        lab = os.path.join(d, f"step-{name}.label")
        if m:
            label = f"TESSERA_GEMM_MN={m.group(1)} TESSERA_FLASH_WG={m.group(2)}"
        elif os.path.exists(lab):
            label = open(lab).read().strip()
        elif name == "unfused":
            label = "TESSERA_FUSED_CASTS=0"
        elif name == "f32grads":
            label = "TESSERA_BF16_GRADS=0"
        else:
            label = name
        rows.append((label, r[-1] if r else None))
    # The whole 3B model's steps (FULL_3B): step_torch.py's lines for each side, as printed.
    for path in sorted(glob.glob(os.path.join(d, "step-3b-full*.txt"))):
        lines = [ln.rstrip() for ln in open(path, errors="replace")
                 if ln.startswith(("tessera", "PyTorch", "step qwen2.5-vl-3b"))]
        print()
        print(f"Whole 3B model ({os.path.basename(path)}):")
        print()
        for ln in lines or ["(no result lines; see the file)"]:
            print(f"    {ln}")
    if not rows:
        return
    print()
    print("| 3B step (bench-3b-8layers, bf16, 4 x 1024 + 448² images) | ms | tokens/s | pipelined ms | peak GiB | loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows:
        if r is None:
            print(f"| {label} | failed (see its json) | | | | |")
        else:
            pipe = f"{r['pipelined_ms']:.1f}" if r.get("pipelined_ms") else "-"
            loss = f"{r['loss']:.4f}" if r.get("loss") is not None else "not finite"
            print(f"| {label} | {r['step_ms_median']:.1f} | {r['tokens_per_s']:.0f} | {pipe} | {r['peak_gib']:.1f} | {loss} |")


if __name__ == "__main__":
    main()
