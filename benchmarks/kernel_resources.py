"""Registers, spills and shared memory of flash_sigmoid's kernels for each autotune config, on any
machine: every kernel is compiled for an H100 (sm_90) without a GPU, and ptxas reports what it uses.

    python benchmarks/kernel_resources.py                           # bf16, head dims 64 and 128, causal and not
    python benchmarks/kernel_resources.py --head-dims 128 --dtype fp16 --dropout --alibi
    python benchmarks/kernel_resources.py --head-dims 64 --causal no --loop [--dropout]   # + inner-loop instructions
    python benchmarks/kernel_resources.py --head-dims 128 --kernels fwd,hopper   # beside the Gluon forward (Hopper)

Use it before spending GPU time on a block-shape or kernel change. The wgmma column says whether
ptxas kept each kernel's Hopper matrix multiplies asynchronous ("async") or waits for each one right
after issuing it ("serial": nothing overlaps them). A thread has at most 255
registers; "spill" bytes are registers moved to local memory, and shared memory above 227 KiB per
program does not launch. Each kernel is compiled as a model-shaped launch specialises it (aligned
pointers, integers divisible by 16 marked, GROUP=1 folded): compiled without that, the counts
come out far higher, and point at a register problem the real kernels do not have (the reverted
TMA experiment in results/kernel_speed.md). Counts differ between Triton versions: run it with the
GPU's.

--loop also disassembles each kernel (nvdisasm, shipped with Triton) and counts the machine
instructions of its longest loop, the one over key or query tiles: what one thread issues per
tile, and the most frequent opcodes. Per-score work shows up there; for the forward at head dim
64, tile 128 x 64 on 8 warps (32 scores a thread), dropout takes the loop from 221 instructions to
382 (557 with an earlier mask's hash per score, 517 with the hashes computed in every tile:
results/kernel_speed.md).
"""
import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("error: unset TRITON_INTERPRET: this compiles the real kernels for the GPU")

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import native_specialize_impl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: flash_sigmoid.py, model.py
import flash_sigmoid as fs  # noqa: E402
import flash_sigmoid_hopper as hopper  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)  # compute capability 9.0, 32-thread warps
KERNELS = {"fwd": fs._fwd_kernel, "dkdv": fs._bwd_dkdv_kernel, "dq": fs._bwd_dq_kernel}
try:  # the Gluon forward: one config, no autotuning (GluonASTSource is Triton's, not a public name)
    from triton.experimental.gluon._runtime import GluonASTSource
    if hopper.gluon is not None:
        KERNELS["hopper"] = hopper._fwd_kernel
except ImportError:
    pass


def launch_arguments(dtype, D, T, H, group):
    """The kernels' non-constexpr arguments as the model launches them: q, k, v sliced from one
    (B, T, H + 2 H_kv, D) projection; O, dO and the gradients in (B, T, H, D) memory. Values matter:
    Triton specialises each launch on them (see launch_signature)."""
    H_kv = H // group
    width = (H + 2 * H_kv) * D  # the qkv projection's row
    strides = dict(q=(T * width, D, width), k=(T * width, D, width), v=(T * width, D, width),
                   o=(T * H * D, D, H * D), do=(T * H * D, D, H * D), dq=(T * H * D, D, H * D),
                   dk=(T * H_kv * D, D, H_kv * D), dv=(T * H_kv * D, D, H_kv * D))
    args = {f"stride_{name}{dim}": s for name, st in strides.items() for dim, s in zip("bht", st)}
    args.update(H=H, GROUP=group, T=T, scale=1.0 / D ** 0.5, dropout_p=0.1)
    args.update({name: f"*{dtype}" for name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")})
    args.update(Bias="*fp32", Slopes="*fp32", DBias="*fp32", DQacc="*fp32", Hashes="*i32")  # DQacc: dK/dV's fp32 dQ
    # (its contiguous strides share the stride_dq* names; as multiples of 16 they specialise alike)
    return args


def launch_signature(kernel, constexprs, args):
    """Signature, constants and attributes as Triton's launcher derives them from the values:
    pointers 16-byte aligned (every torch allocation is), integers divisible by 16 marked so (it
    vectorises loads), integers equal to 1 folded into constants, floats left alone."""
    backend = make_backend(H100)
    signature, constants, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        value = args.get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(value, str):  # a pointer
            signature[name], attrs[(i,)] = value, backend.parse_attr("D")
        else:
            kind, attr = native_specialize_impl(backend, value, False, True, True)
            signature[name] = kind
            if kind == "constexpr":
                constants[name] = attr
            elif isinstance(attr, str):
                attrs[(i,)] = backend.parse_attr(attr)
    return signature, constants, attrs


def loop_opcodes(cubin: bytes) -> collections.Counter:
    """Opcode counts of the longest loop (a backward branch's span) in a cubin's disassembly."""
    nvdisasm = os.path.join(os.path.dirname(get_ptxas(90).path), "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    code, labels, pending = [], {}, []  # (address, opcode, operands); label -> address of the next instruction
    for line in sass.splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", line):
            pending.append(label.group(1))
        elif ins := re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)\S*(.*)", line):
            address = int(ins.group(1), 16)
            labels.update(dict.fromkeys(pending, address))
            pending = []
            code.append((address, ins.group(2), ins.group(3)))
    loops = [(labels[target.group(1)], address) for address, op, rest in code
             if op == "BRA" and (target := re.search(r"(\.L_x_\d+)", rest)) and labels[target.group(1)] < address]
    if not loops:
        return collections.Counter()
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return collections.Counter(op for address, op, _ in code if start <= address <= end)


def wgmma_serialized(ptxas_report: str) -> bool:
    """Whether ptxas waits for every wgmma right after issuing it, having failed to prove the overlap
    safe (its notes C7514, C7515 and kin: "wgmma.mma_async instructions are serialized due to ..."):
    the tensor cores then idle between matrix multiplies."""
    return "wgmma.mma_async instructions are serialized" in ptxas_report


def resources(kernel, config, constexprs, args, loop=False):
    """(registers per thread, spill store bytes, shared memory bytes, whether ptxas serialized its wgmmas)
    of one compiled config (kernel: a @triton.jit or @gluon.jit function), and with loop the opcode
    counts of its inner loop."""
    signature, constants, attrs = launch_signature(kernel, {**constexprs, **config.kwargs}, args)
    source = GluonASTSource if kernel is KERNELS.get("hopper") else ASTSource  # kernel: the jit function itself
    compiled = triton.compile(source(kernel, signature, constants, attrs), target=H100,
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        ptxas = get_ptxas(90).path  # the ptxas Triton itself compiles with
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True).stderr
    serial = wgmma_serialized(report)
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    if registers is None:
        raise RuntimeError(f"ptxas said: {report.strip()[-300:]}")
    ops = loop_opcodes(compiled.asm["cubin"]) if loop else None
    return int(registers.group(1)), int(spills.group(1)) if spills else 0, compiled.metadata.shared, serial, ops


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--seq-len", type=int, default=4096, help="T (only whether it divides by 16 matters)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--group", type=int, default=1, help="query heads per key/value head (GQA)")
    p.add_argument("--kernels", default="fwd,dkdv,dq", help="comma-separated subset of fwd, dkdv, dq, hopper "
                   "(the Gluon forward of flash_sigmoid_hopper.py, where Triton has Gluon)")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--dropout", action="store_true", help="the kernels with attention dropout compiled in")
    p.add_argument("--alibi", action="store_true", help="the kernels with ALiBi compiled in")
    p.add_argument("--loop", action="store_true", help="also the instructions of each kernel's inner loop, per thread")
    args = p.parse_args()
    for name in args.kernels.split(","):
        if name not in KERNELS:
            sys.exit(f"error: --kernels takes {', '.join(KERNELS)}; got {name!r}")
        if name == "hopper" and (args.dropout or args.alibi):
            sys.exit("error: the hopper forward has no dropout or ALiBi (those launches take the portable kernel): "
                     "drop --dropout and --alibi")
    for D in args.head_dims:
        if D not in fs.SUPPORTED_HEAD_DIMS:
            sys.exit(f"error: --head-dims takes {', '.join(map(str, fs.SUPPORTED_HEAD_DIMS))} (the kernel's); got {D}")
    print(f"triton {triton.__version__}, sm_90, {args.dtype}, T={args.seq_len}, {args.heads} heads, group {args.group}; "
          "config = (BLOCK_M, BLOCK_N, warps, stages)")
    print(f"{'kernel':6} {'D':>4} causal {'config':18} {'registers':>9} {'spill B':>8} {'shared KiB':>10} wgmma"
          + ("  loop instructions (top opcodes)" if args.loop else ""))
    for D in args.head_dims:
        for causal in {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]:
            for name in args.kernels.split(","):
                if name == "hopper":  # one config, its num_warps a constexpr argument
                    kernel, constexprs = KERNELS[name], dict(HEAD_DIM=D, CAUSAL=causal, num_warps=hopper.NUM_WARPS)
                    configs = [triton.Config({"BLOCK_M": hopper.BLOCK_M, "BLOCK_N": hopper.BLOCK_N},
                                             num_warps=hopper.NUM_WARPS, num_stages=1)]
                else:
                    kernel, configs = KERNELS[name].fn, KERNELS[name].configs
                    constexprs = dict(HEAD_DIM=D, CAUSAL=causal, HAS_ALIBI=args.alibi, DROPOUT=args.dropout, FAST=True)
                if name == "dkdv":  # with dQ fused, as the backward launches it at D >= 128, T >= 16384
                    constexprs.update(BIAS_GRAD=False, FUSE_DQ=True)
                for config in configs:
                    shape = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
                    launch = launch_arguments(args.dtype, D, args.seq_len, args.heads, args.group)
                    regs, spill, shared, serial, ops = resources(kernel, config, constexprs, launch, args.loop)
                    top = f"  {sum(ops.values()):5} ({', '.join(f'{op} {n}' for op, n in ops.most_common(6))})" if args.loop else ""
                    print(f"{name:6} {D:4} {causal!s:6} {str(shape):18} {regs:9} {spill:8} {shared / 1024:10.1f} "
                          f"{'serial' if serial else 'async'}{top}",
                          flush=True)


if __name__ == "__main__":
    main()
