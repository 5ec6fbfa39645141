"""PyTorch baselines on the GPU for `tessera bench cuda` and `tessera bench matmul --device cuda`:
the same ops at the same shapes, bf16, CUDA-event medians. Prints JSON lines.

    python3 tools/gpu/torch_baselines.py [--rows 16384 --cols 4096]
"""
import argparse
import json

import torch
import torch.nn.functional as F


def time_ms(f, reps=20, batch=10):
    """Median ms per call over `reps` event pairs, each around `batch` back-to-back calls (the
    same scheme as `tessera bench cuda`)."""
    f()
    f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(batch):
            f()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / batch)
    ts.sort()
    return ts[len(ts) // 2]


def emit(**kw):
    print(json.dumps(kw), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--sizes", default="1024,2048,4096x2048x2048,4096x2048x256,4096x2048x11008,4096x11008x2048,2048x4096x2048,256x4096x2048,11008x4096x2048,2048x4096x11008,4096x2048x2560,2560x4096x2048,4096x1280x1280,4096x3424x1280,3424x4096x1280,4096x2048x151936,4096x151936x2048,151936x4096x2048")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    bf = torch.bfloat16
    R, C = a.rows, a.cols
    n = R * C
    x = torch.randn(R, C, device=dev, dtype=bf)
    g = torch.randn(R, C, device=dev, dtype=bf)
    w = torch.randn(C, device=dev, dtype=bf)
    y = torch.empty_like(x)
    emit(kernel="copy (cuMemcpyDtoD)", ms=time_ms(lambda: y.copy_(x)))
    emit(kernel="rms_norm fwd", ms=time_ms(lambda: F.rms_norm(x, (C,), w, 1e-6)))

    def fb(f, *ins):
        ins = [t.detach().requires_grad_() for t in ins]
        out = f(*ins)
        torch.autograd.grad(out, ins, g if out.dim() else None)

    emit(kernel="rms_norm fwd+bwd", ms=time_ms(lambda: fb(lambda t: F.rms_norm(t, (C,), w, 1e-6), x)))
    emit(kernel="softmax fwd", ms=time_ms(lambda: torch.softmax(x, -1)))
    emit(kernel="softmax fwd+bwd", ms=time_ms(lambda: fb(lambda t: torch.softmax(t, -1), x)))
    up = torch.randn(R, C, device=dev, dtype=bf)
    emit(kernel="swiglu fwd", ms=time_ms(lambda: F.silu(x) * up))
    emit(kernel="swiglu fwd+bwd", ms=time_ms(lambda: fb(lambda s, u: F.silu(s) * u, x, up)))
    del up
    d, h = 128, 32
    t = max(n // (d * h), 1)
    q = x.reshape(1, h, t, d)
    cos = torch.randn(t, d, device=dev, dtype=bf)
    sin = torch.randn(t, d, device=dev, dtype=bf)

    def rope(q):
        q1, q2 = q[..., : d // 2], q[..., d // 2 :]
        return q * cos + torch.cat((-q2, q1), -1) * sin

    emit(kernel="rope fwd", ms=time_ms(lambda: rope(q)))
    emit(kernel="row sum (read-only)", ms=time_ms(lambda: x.sum(-1)))
    targets = (torch.arange(R, device=dev) * 7919) % C
    emit(kernel="cross_entropy fwd", ms=time_ms(lambda: F.cross_entropy(x, targets)))

    def ce_fb():
        t_ = x.detach().requires_grad_()
        torch.autograd.grad(F.cross_entropy(t_, targets), [t_])

    emit(kernel="cross_entropy fwd+bwd", ms=time_ms(ce_fb))
    del x, g, y, q
    # The 3B model's loss as transformers computes it: bf16 logits [4096, 151936] upcast to f32.
    lg = torch.randn(4096, 151936, device=dev, dtype=bf)
    lt = (torch.arange(4096, device=dev) * 7919) % 151936
    emit(kernel="cross_entropy fwd, the 3B model's loss",
         ms=time_ms(lambda: F.cross_entropy(lg.float(), lt)))

    def ce_model_fb():
        t_ = lg.detach().requires_grad_()
        torch.autograd.grad(F.cross_entropy(t_.float(), lt), [t_])

    emit(kernel="cross_entropy fwd+bwd, the 3B model's loss", ms=time_ms(ce_model_fb))
    del lg
    p = torch.nn.Parameter(torch.randn(n, device=dev) * 0.02)
    p.grad = torch.randn(n, device=dev)
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    emit(kernel="adamw step", ms=time_ms(opt.step))
    del p, opt
    # The tensors of two 3B text layers (as `tessera bench cuda`): PyTorch's fused AdamW (a few
    # multi-tensor launches) beside our one launch, its single-tensor loop beside our launch per
    # tensor.
    layer = [(2048, 2048), (2048,), (256, 2048), (256,), (256, 2048), (256,), (2048, 2048),
             (11008, 2048), (11008, 2048), (2048, 11008), (2048,), (2048,)]
    ps = [torch.nn.Parameter(torch.randn(sh, device=dev) * 0.02) for sh in layer * 2]
    for p_ in ps:
        p_.grad = torch.randn_like(p_)
    for label, kw in [("one launch", {"fused": True}), ("a launch per tensor", {"foreach": False})]:
        opt = torch.optim.AdamW(ps, lr=1e-4, **kw)
        emit(kernel=f"adamw step, {len(ps)} tensors of 2 text layers ({label})", ms=time_ms(opt.step))
        del opt
    del ps
    for s in a.sizes.split(","):
        dims = [int(v) for v in s.split("x")]
        m, k, nn = dims * 3 if len(dims) == 1 else dims
        A = torch.randn(m, k, device=dev, dtype=bf)
        B = torch.randn(k, nn, device=dev, dtype=bf)
        ms = time_ms(lambda: A @ B)
        emit(op="matmul", device="torch", dtype="bf16", m=m, k=k, n=nn, ms=ms, tflops=2 * m * k * nn / ms / 1e9)
        # A stored transposed ([k, m]), as the weight gradients read it: the reference for
        # tessera's `matmul_mn_ab` rows in their own layout.
        At = A.t().contiguous()
        del A
        ms = time_ms(lambda: At.t() @ B)
        emit(op="matmul_at", device="torch", dtype="bf16", m=m, k=k, n=nn, ms=ms, tflops=2 * m * k * nn / ms / 1e9)
        del At, B
    for (b, hh, tt, dd) in [(4, 16, 1024, 128), (4, 16, 2048, 64)]:
        qq = torch.randn(b, hh, tt, dd, device=dev, dtype=bf)
        ms = time_ms(lambda: F.scaled_dot_product_attention(qq, qq, qq, is_causal=True))
        emit(op="attention", device="torch", b=b, h=hh, t=tt, d=dd, ms=ms,
             tflops=4 * b * hh * tt * tt * dd / 2 / ms / 1e9)
        go = torch.randn_like(qq)

        def fb():
            q_, k_, v_ = (qq.detach().requires_grad_() for _ in range(3))
            o_ = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
            torch.autograd.grad(o_, [q_, k_, v_], go)

        ms = time_ms(fb)
        emit(op="attention_fwd_bwd", device="torch", b=b, h=hh, t=tt, d=dd, ms=ms,
             tflops=3.5 * 4 * b * hh * tt * tt * dd / 2 / ms / 1e9)
        # The backward alone: one forward kept, its graph reused.
        q_, k_, v_ = (qq.detach().requires_grad_() for _ in range(3))
        o_ = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
        ms = time_ms(lambda: torch.autograd.grad(o_, [q_, k_, v_], go, retain_graph=True))
        emit(op="attention_bwd", device="torch", b=b, h=hh, t=tt, d=dd, ms=ms,
             tflops=2.5 * 4 * b * hh * tt * tt * dd / 2 / ms / 1e9)
        del q_, k_, v_, o_
    # The 3B bench's vision attention (`tessera bench cuda`'s attention_vision rows): 4 images of
    # 1024 patches, 16 heads of 80, non-causal, in windows of 64 or whole; SDPA on the same work
    # batched ([windows, heads, 64, 80]), the layout most favourable to it.
    for case, seg in [("windows of 64", 64), ("whole images of 1024", 1024)]:
        h, t, d = 16, 4096, 80
        qq = torch.randn(t // seg, h, seg, d, device=dev, dtype=bf)
        go = torch.randn_like(qq)
        flops = 4 * h * t * seg * d
        ms = time_ms(lambda: F.scaled_dot_product_attention(qq, qq, qq))
        emit(op="attention_vision", device="torch", case=case, kernel="SDPA", h=h, t=t, d=d, seg=seg,
             ms=ms, tflops=flops / ms / 1e9, **{"pass": "fwd"})
        q_, k_, v_ = (qq.detach().requires_grad_() for _ in range(3))
        o_ = F.scaled_dot_product_attention(q_, k_, v_)
        ms = time_ms(lambda: torch.autograd.grad(o_, [q_, k_, v_], go, retain_graph=True))
        emit(op="attention_vision", device="torch", case=case, kernel="SDPA", h=h, t=t, d=d, seg=seg,
             ms=ms, tflops=2.5 * flops / ms / 1e9, **{"pass": "bwd"})
        del q_, k_, v_, o_


if __name__ == "__main__":
    main()
