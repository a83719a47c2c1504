"""Registers, spills and shared memory of flash_sigmoid's kernels for each autotune config, on any
machine: every kernel is compiled for an H100 (sm_90) without a GPU, and ptxas reports what it uses.

    python kernel_resources.py                           # bf16, head dims 64 and 128, causal and not
    python kernel_resources.py --head-dims 128 --dtype fp16 --dropout --alibi

Use it before spending GPU time on a block-shape or kernel change. A thread has at most 255
registers; "spill" bytes are registers moved to local memory, and shared memory above 227 KiB per
program does not launch. Session 3 found every D=128 config at 255 registers with spills, and that
removing them (TMA loads) did not make the kernels faster: results/attention_h100.md.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("error: unset TRITON_INTERPRET: this compiles the real kernels for the GPU")

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

import flash_sigmoid as fs

H100 = GPUTarget("cuda", 90, 32)  # compute capability 9.0, 32-thread warps
KERNELS = {"fwd": fs._fwd_kernel, "dkdv": fs._bwd_dkdv_kernel, "dq": fs._bwd_dq_kernel}


def pointer_and_scalar_types(dtype):
    """Triton signature types of the kernels' non-constexpr arguments; unnamed ones are int32."""
    types = {name: f"*{dtype}" for name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")}
    types.update({name: "*fp32" for name in ("Bias", "Slopes", "DBias")})
    types.update(Seed="*i64", scale="fp32", dropout_p="fp32")
    return types


def resources(kernel, config, constexprs, types):
    """(registers per thread, spill store bytes, shared memory bytes) of one compiled config."""
    constexprs = {**constexprs, **config.kwargs}
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.fn.arg_names}
    compiled = triton.compile(ASTSource(kernel.fn, signature, constexprs), target=H100,
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        ptxas = get_ptxas(90).path  # the ptxas Triton itself compiles with
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    if registers is None:
        raise RuntimeError(f"ptxas said: {report.strip()[-300:]}")
    return int(registers.group(1)), int(spills.group(1)) if spills else 0, compiled.metadata.shared


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--kernels", default="fwd,dkdv,dq", help="comma-separated subset of fwd, dkdv, dq")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--dropout", action="store_true", help="the kernels with attention dropout compiled in")
    p.add_argument("--alibi", action="store_true", help="the kernels with ALiBi compiled in")
    args = p.parse_args()
    for name in args.kernels.split(","):
        if name not in KERNELS:
            sys.exit(f"error: --kernels takes fwd, dkdv, dq; got {name!r}")
    print(f"triton {triton.__version__}, sm_90, {args.dtype}; config = (BLOCK_M, BLOCK_N, warps, stages)")
    print(f"{'kernel':6} {'D':>4} causal {'config':18} {'registers':>9} {'spill B':>8} {'shared KiB':>10}")
    for D in args.head_dims:
        for causal in {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]:
            for name in args.kernels.split(","):
                kernel = KERNELS[name]
                constexprs = dict(HEAD_DIM=D, CAUSAL=causal, HAS_ALIBI=args.alibi, DROPOUT=args.dropout, FAST=True)
                if name == "dkdv":
                    constexprs["BIAS_GRAD"] = False
                for config in kernel.configs:
                    shape = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
                    regs, spill, shared = resources(kernel, config, constexprs, pointer_and_scalar_types(args.dtype))
                    print(f"{name:6} {D:4} {causal!s:6} {str(shape):18} {regs:9} {spill:8} {shared / 1024:10.1f}", flush=True)


if __name__ == "__main__":
    main()
