"""Compile one kernels/*.cu file the way src/backend/cuda/compile.rs does (common.cuh prepended,
NVRTC, the same options) to PTX, then run ptxas -v on it and print each kernel's registers,
spills and shared memory. For kernel work without a GPU or a cargo build:

    python3 tools/gpu/kernel_resources.py kernels/flash.cu [--arch sm_90] [--filter flash_fwd]
        [--sass] [--check]

Needs libnvrtc.so.13 (LD_LIBRARY_PATH or target/nvrtc/...) and ptxas (PATH or target/nvcc/...),
both installable from PyPI: pip install --target target/nvrtc nvidia-cuda-nvrtc; pip install
--target target/nvcc nvidia-cuda-nvcc.

--sass also disassembles the cubin (nvdisasm: PATH or target/nvdisasm/..., pip install --target
target/nvdisasm nvidia-cuda-nvdisasm) and prints, per kernel, the highest register its SASS
uses. ptxas's "Used N registers" is the count at launch; a warp-specialised kernel's consumer
branch may use more after `setmaxnreg.inc` (or be held to N: a trap in that branch does it).
"""
import argparse
import ctypes
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_nvrtc():
    for p in ["libnvrtc.so.13", os.path.join(ROOT, "target/nvrtc/nvidia/cu13/lib/libnvrtc.so.13")]:
        try:
            return ctypes.CDLL(p)
        except OSError:
            pass
    sys.exit("libnvrtc.so.13 not found (pip install --target target/nvrtc nvidia-cuda-nvrtc)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--filter", default="")
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 on any spill or ptxas wgmma note (C75xx): the CI gate of the Hopper kernels")
    a = ap.parse_args()
    name = os.path.basename(a.file)
    body = open(a.file).read()
    src = open(os.path.join(ROOT, "kernels/common.cuh")).read()
    if "TESSERA_ARCH_SUFFIX_A" in body:  # as src/backend/cuda/compile.rs: the Hopper helpers too
        src += '\n#line 1 "hopper.cuh"\n' + open(os.path.join(ROOT, "kernels/hopper.cuh")).read()
    src += f'\n#line 1 "{name}"\n' + body
    arch = a.arch
    if "TESSERA_ARCH_SUFFIX_A" in src and arch == "sm_90":
        arch = "sm_90a"
    nv = load_nvrtc()
    prog = ctypes.c_void_p()
    assert nv.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None) == 0
    opts = ["--std=c++17", "-default-device", "--extra-device-vectorization", f"--gpu-architecture={arch}"]
    copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nv.nvrtcCompileProgram(prog, len(opts), copts)
    n = ctypes.c_size_t()
    nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nv.nvrtcGetProgramLog(prog, log)
    if log.value.strip():
        print(log.value.decode(), file=sys.stderr)
    if rc != 0:
        sys.exit(f"nvrtc failed on {a.file} ({rc})")
    nv.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    nv.nvrtcGetPTX(prog, ptx)
    path = f"/tmp/{name}.{arch}.ptx"
    open(path, "wb").write(ptx.value)
    ptxas = "ptxas"
    local = os.path.join(ROOT, "target/nvcc/nvidia/cu13/bin/ptxas")
    if os.path.exists(local):
        ptxas = local
    out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", path + ".cubin"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr)
    kern = None
    bad = []
    for line in out.stderr.splitlines():
        # ptxas's notes on wgmma (C7510 serialised, C7517 a wait injected): performance bugs.
        if "(C75" in line:
            print(line.strip())
            bad.append(line.strip())
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            kern = m.group(1)
            continue
        if kern and a.filter in kern and ("Used" in line or "spill" in line):
            print(f"{kern:40s} {line.split('info    :')[-1].strip()}")
            if re.search(r"[1-9]\d* bytes spill (stores|loads)", line):
                bad.append(f"{kern}: {line.split('info    :')[-1].strip()}")
    if a.sass:
        bad += sass_registers(path + ".cubin", a.filter)
    if a.check and bad:
        sys.exit(f"{a.file} ({arch}): " + "; ".join(bad))


# Kernels whose softmax must run between the two wgmma waits (FlashAttention-3's intra-warpgroup
# overlap: S_i's softmax while P_{i-1} V_{i-1} is on the tensor cores), and the fewest exp2
# (MUFU.EX2) the SASS must place there: a 128-key tile is 64 exponentials per thread.
# The backward's consumers wait for Sᵀ (S) with one group still in flight (dPᵀ, dP) and compute
# the tile's exponentials (32 for dK/dV, 64 for dQ) before the next wait.
OVERLAP_KERNELS = {"_wgo_": 32, "_wgp_": 32, "_bwd_dkdv_wg_": 32, "_bwd_dq_wg_": 64}


def overlap_min(kern):
    """The fewest exp2 `kern` must run between its wgmma waits (None: not an overlap kernel)."""
    return next((v for k, v in OVERLAP_KERNELS.items() if k in kern), None)


def sass_registers(cubin, filt):
    """Prints each kernel's highest SASS register and, for the overlap kernels, the exp2 between
    `DEPBAR.LE gsb0, 0x1` and the next wgmma wait; returns the overlap kernels with fewer than
    their OVERLAP_KERNELS minimum there (ptxas hoisted the second wait above the math)."""
    nvdisasm = "nvdisasm"
    local = os.path.join(ROOT, "target/nvdisasm/nvidia/cu13/bin/nvdisasm")
    if os.path.exists(local):
        nvdisasm = local
    out = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr)
    top, kern = {}, None
    overlap = {}  # kernel -> most exp2 between a wait for 1 group and the next wait
    between = None
    for line in out.stdout.splitlines():
        m = re.match(r"\.text\.(\w+):", line)
        if m:
            kern = m.group(1)
            top[kern] = -1
            between = None
            if overlap_min(kern) is not None:
                overlap[kern] = 0
            continue
        if kern:
            regs = [int(r) for r in re.findall(r"\bR(\d+)\b", line)]
            if regs:
                top[kern] = max(top[kern], max(regs))
            if kern in overlap:
                if re.search(r"DEPBAR\.LE\s+gsb0,\s*0x1\b", line):
                    if between is not None:
                        overlap[kern] = max(overlap[kern], between)
                    between = 0
                elif re.search(r"DEPBAR\.LE\s+gsb0,\s*0x0\b", line) and between is not None:
                    overlap[kern] = max(overlap[kern], between)
                    between = None
                elif between is not None and "MUFU.EX2" in line:
                    between += 1
    bad = []
    for kern, r in sorted(top.items()):
        if filt in kern:
            extra = ""
            if kern in overlap:
                extra = f", {overlap[kern]} exp2 between the wgmma waits"
                if overlap[kern] < overlap_min(kern):
                    bad.append(f"{kern}: only {overlap[kern]} exp2 between the wgmma waits (no overlap)")
            print(f"{kern:40s} SASS uses R0..R{r} ({r + 1} registers){extra}")
    return bad


if __name__ == "__main__":
    main()
