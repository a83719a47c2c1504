"""Check flash_sigmoid against float64 on the GPU, then time it beside its peers in one process.

    git show HEAD~1:flash_sigmoid.py > /tmp/parent.py
    python benchmarks/bench_attention.py --baseline /tmp/parent.py   # check, then the table (printed last)
    python benchmarks/bench_attention.py --check-only     # correctness only: both backwards, dropout, GQA
    python benchmarks/bench_attention.py --no-check --baseline /tmp/parent.py --out results/table.md
    python benchmarks/bench_attention.py --no-check --cuda-graphs --seq-lens 1024   # GPU time only, no host work
    python benchmarks/bench_attention.py --sweep          # each kernel's candidate block shapes, one at a time

Peers (--impls): SDPA softmax with the cuDNN and flash (FlashAttention-2) backends, the PyPI package
triton-sigmoid when it is installed (no dropout), and with --baseline another copy of
flash_sigmoid.py (an older commit's, say) as the peer "baseline", so a kernel change is timed
against its parent in one run; on request the PyTorch reference (eager and torch.compile'd, up to
--ref-max-t: it holds the (T, T) scores), flash_sigmoid with the exact sigmoid, and flash_sigmoid with
its Gluon forward (flash_sigmoid_hopper.py; on a Hopper GPU the check covers it too) forced on or
off: flash_sigmoid_hopper and flash_sigmoid_portable, timed only where the Gluon forward applies, and with dQ
fused into the dK/dV kernel or from its own at every shape: flash_sigmoid_fused_dq and flash_sigmoid_own_dq. bf16, B*T = 16k
tokens, 16 heads, attention dropout 0 and 0.1 (each peer applying its own). FLOPs count
4*B*H*T*T*D for the forward (half when causal) and 2.5x that for the backward.
"""
import argparse
import datetime
import math
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: flash_sigmoid.py, model.py
import flash_sigmoid as fs  # noqa: E402
from tests.attention_float64 import dropout_keep_mask, rel_err  # noqa: E402

torch._dynamo.config.cache_size_limit = 64  # the compiled reference recompiles for every shape


def poison_cache():
    """Fill then free memory so torch.empty hands NaNs to any output element a kernel forgets."""
    torch.empty(1 << 28, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def check_case(B, H, H_kv, T, D, causal, dtype, alibi, learnable, dropout=0.0, fast=True, deterministic=False,
               hopper=False):
    """Max relative error of out, dq, dk, dv (and d bias) against the reference run in float64
    (with dropout: the reference applies the kernel's own mask, rewritten in torch). deterministic:
    the backward under torch.use_deterministic_algorithms (dQ from its own kernel, not atomics);
    otherwise dQ is fused at every head dim, so both backwards are checked everywhere. hopper: the
    Gluon forward switched on (it takes the launches flash_sigmoid_hopper.supports)."""
    fs.FAST_SIGMOID, fuse_from, hopper_before = fast, (fs.FUSE_DQ_MIN_HEAD_DIM, fs.FUSE_DQ_MIN_T), fs.HOPPER_FORWARD
    fs.FUSE_DQ_MIN_HEAD_DIM, fs.FUSE_DQ_MIN_T, fs.HOPPER_FORWARD = 0, 0, hopper
    q = torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, H_kv, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    bias = torch.linspace(-math.log(T), -1.0, H, device="cuda").requires_grad_(learnable)
    slopes = torch.rand(H, device="cuda") * 0.1 if alibi else None
    do = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
    seed = torch.randint(2**62, (1,), device="cuda")
    poison_cache()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        out = fs.flash_sigmoid(q, k, v, causal, bias, None, slopes, dropout, seed)
        grads = torch.autograd.grad(out, [q, k, v] + ([bias] if learnable else []), do)
    finally:
        torch.use_deterministic_algorithms(False)
        fs.FAST_SIGMOID, (fs.FUSE_DQ_MIN_HEAD_DIM, fs.FUSE_DQ_MIN_T), fs.HOPPER_FORWARD = True, fuse_from, hopper_before
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    keep = dropout_keep_mask(seed, B, H, T, dropout).cuda() if dropout else None
    ref = fs.sigmoid_attention_reference(*ref_in[:3], causal, ref_in[3], None,
                                         None if slopes is None else slopes.double(), dropout, keep)
    ref_grads = torch.autograd.grad(ref, ref_in[:3] + (ref_in[3:] if learnable else []), do.double())
    errs = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    return [e if math.isfinite(e) else float("inf") for e in errs]


def check(bound=1e-2, args_exact=True):
    print("## correctness: ||out - ref|| / ||ref|| against the float64 reference, fresh random inputs")
    print("backward: 'atomic' = dQ fused into the dK/dV kernel (forced here at every shape; the default at "
          "D >= 128, T >= 16384), 'determ' = under torch.use_deterministic_algorithms(True)")
    print(f"{'B':>2} {'H':>3} {'Hkv':>3} {'T':>5} {'D':>4} causal dtype    alibi learn drop sigmoid  backward "
          "out      dq       dk       dv       dbias")
    bf16, fp16 = torch.bfloat16, torch.float16
    cases = [  # B, H, H_kv, T, D, causal, dtype, alibi, learnable bias, dropout; odd T throughout
        (2, 4, 4, 1065, 64, True, bf16, False, False, 0.0),
        (2, 4, 4, 1065, 64, False, fp16, False, False, 0.0),
        (2, 4, 4, 1129, 128, True, fp16, False, False, 0.0),
        (2, 4, 4, 1129, 128, False, bf16, False, False, 0.0),
        (2, 4, 4, 1017, 16, True, bf16, False, False, 0.0),
        (2, 4, 1, 333, 32, False, fp16, True, True, 0.0),
        (4, 4, 2, 1, 64, True, bf16, False, True, 0.0),  # one token
        (1, 8, 2, 2049, 64, True, bf16, False, True, 0.0),  # GQA, learnable bias
        (1, 8, 8, 777, 128, True, fp16, True, False, 0.0),  # ALiBi
        (1, 8, 2, 1031, 64, True, bf16, False, True, 0.2),  # attention dropout
        (1, 8, 2, 999, 128, True, fp16, False, False, 0.1),
        (2, 4, 4, 517, 128, False, fp16, True, False, 0.1),
        (2, 4, 2, 701, 64, False, bf16, False, False, 0.1),
        (1, 4, 4, 4096, 128, False, bf16, False, False, 0.0),
        (1, 2, 2, 16384, 64, True, bf16, False, False, 0.0),
    ]
    failed = 0
    for n, case in enumerate(cases):
        for fast in (True, False) if args_exact and n in (2, 7, len(cases) - 1) else (True,):
            for deterministic in (False, True):
                errs = check_case(*case, fast=fast, deterministic=deterministic)
                ok = max(errs) < bound
                failed += not ok
                B, H, H_kv, T, D, causal, dtype, alibi, learn, drop = case
                print(f"{B:>2} {H:>3} {H_kv:>3} {T:>5} {D:>4} {causal!s:6} {str(dtype)[6:]:8} {alibi!s:5} {learn!s:5} "
                      f"{drop:<4} {'tanh' if fast else 'exact':8} {'determ' if deterministic else 'atomic':8} "
                      + " ".join(f"{e:.2e}" for e in errs) + ("" if ok else "  FAIL"), flush=True)
    if fs.flash_sigmoid_hopper.supports(*(torch.empty(1, 1, fs.flash_sigmoid_hopper.MIN_T, 128, device="cuda",
                                                      dtype=torch.bfloat16),) * 3):
        launch, calls = fs.flash_sigmoid_hopper.forward, []
        fs.flash_sigmoid_hopper.forward = lambda *a: calls.append(1) or launch(*a)  # counted: it must run
        try:
            for case in [(1, 4, 2, 4097, 128, True, bf16, False, True, 0.0),
                         (2, 2, 2, 4159, 128, False, fp16, False, False, 0.0)]:
                calls.clear()
                errs = check_case(*case, hopper=True)
                if not calls:  # the portable forward ran instead
                    errs = [float("inf")]
                failed += max(errs) >= bound
                print(f"hopper forward (Gluon) {case[:6]} {str(case[6])[6:]}: " + " ".join(f"{e:.2e}" for e in errs)
                      + ("" if max(errs) < bound else "  FAIL"), flush=True)
        finally:
            fs.flash_sigmoid_hopper.forward = launch
    failed += not check_compile()
    print("correctness:", "PASS" if not failed else f"{failed} FAILED")
    return failed == 0


def check_compile():
    """torch.compile keeps the kernel: fullgraph=True raises on any graph break. With dropout too
    (one fixed seed tensor, so eager and compiled draw the same mask)."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    seed = torch.randint(2**62, (1,), device="cuda")
    run = lambda q, k, v: fs.flash_sigmoid(q, k, v, causal=True, dropout_p=0.1, dropout_seed=seed)
    f = lambda q, k, v: run(q, k, v).float().square().sum()
    out_e = run(q, k, v)
    g_eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    ok = True
    for backend in ("aot_eager", "inductor"):
        try:
            out_c = torch.compile(run, backend=backend, fullgraph=True)(q, k, v)
            g_comp = torch.autograd.grad(torch.compile(f, backend=backend, fullgraph=True)(q, k, v), (q, k, v))
            errs = [rel_err(out_c, out_e)] + [rel_err(a, b) for a, b in zip(g_comp, g_eager)]
            nan = [bool(t.isnan().any()) for t in (out_c,) + g_comp]
            print(f"torch.compile(fullgraph=True, backend={backend}) vs eager: out, dq, dk, dv "
                  + " ".join(f"{e:.2e}" for e in errs) + f"  nan: {nan}  eager nan: {[bool(t.isnan().any()) for t in g_eager]}")
            ok &= max(errs) < 1e-2
        except Exception as e:  # report and go on to the timings
            print(f"torch.compile backend={backend} failed: {type(e).__name__}: {str(e)[:300]}")
            ok = False
    try:  # as in training: the seed drawn inside the compiled graph
        out = torch.compile(lambda q, k, v: fs.flash_sigmoid(q, k, v, dropout_p=0.1), fullgraph=True)(q, k, v)
        dropped = (out - fs.flash_sigmoid(q, k, v)).abs().max().item()
        print(f"torch.compile(inductor) drawing its own dropout seed: finite {bool(out.isfinite().all())}, "
              f"max change from no dropout {dropped:.3f}")
        ok &= bool(out.isfinite().all()) and dropped > 0
    except Exception as e:
        print(f"torch.compile with a seed drawn in the graph failed: {type(e).__name__}: {str(e)[:300]}")
        ok = False
    return ok


def sdpa(backend):
    def run(q, k, v, causal, dropout_p):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
    return run


def load_baseline(path):
    """Another flash_sigmoid.py as a module; its custom ops renamed so both files can register them."""
    import types
    source = open(path).read().replace("flash_sigmoid::", "flash_sigmoid_baseline::")
    module = types.ModuleType("flash_sigmoid_baseline")
    module.__file__ = path
    sys.modules[module.__name__] = module  # torch.compile looks functions' modules up by name
    exec(compile(source.replace("torch.ops.flash_sigmoid.", "torch.ops.flash_sigmoid_baseline."), path, "exec"),
         module.__dict__)
    return module


DEFAULT_IMPLS = "flash_sigmoid,baseline,sdpa_cudnn,sdpa_flash,triton_sigmoid"


def peers(ref_max_t, baseline=""):
    """name -> (fn(q, k, v, causal, dropout_p), max T or None)."""
    impls = {
        "flash_sigmoid": (lambda q, k, v, c, p: fs.flash_sigmoid(q, k, v, causal=c, dropout_p=p), None),
        "flash_sigmoid_exact": (exact_sigmoid, None),
        "flash_sigmoid_hopper": (lambda *args: hopper_switch(True, *args), None),
        "flash_sigmoid_portable": (lambda *args: hopper_switch(False, *args), None),
        "flash_sigmoid_fused_dq": (lambda q, k, v, c, p: DQSwitch.apply(q, k, v, c, p, True), None),
        "flash_sigmoid_own_dq": (lambda q, k, v, c, p: DQSwitch.apply(q, k, v, c, p, False), None),
        "sdpa_flash": (sdpa(SDPBackend.FLASH_ATTENTION), None),
        "sdpa_cudnn": (sdpa(SDPBackend.CUDNN_ATTENTION), None),
        "torch_ref": (lambda q, k, v, c, p: fs.sigmoid_attention_reference(q, k, v, causal=c, dropout_p=p), ref_max_t),
        "torch_ref_compiled": (torch.compile(lambda q, k, v, c, p: fs.sigmoid_attention_reference(
            q, k, v, causal=c, dropout_p=p), dynamic=False), ref_max_t),
    }
    if baseline:
        old = load_baseline(baseline)
        impls["baseline"] = (lambda q, k, v, c, p: old.flash_sigmoid(q, k, v, causal=c, dropout_p=p), None)
    try:
        import triton_sigmoid  # takes (B, T, H, D); no dropout
        impls["triton_sigmoid"] = (lambda q, k, v, c, p: None if p else triton_sigmoid.sigmoid_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=c).transpose(1, 2), None)
    except ImportError:
        print("triton-sigmoid is not installed: its column is empty")
    return impls


def hopper_switch(on, q, k, v, causal, dropout_p):
    """flash_sigmoid with its Gluon forward switched on or off, whatever the default; None (an empty cell)
    where the Gluon forward would not be taken, so the two peers differ only where it is."""
    if dropout_p or not fs.flash_sigmoid_hopper.supports(q, k, v):
        return None
    before, fs.HOPPER_FORWARD = fs.HOPPER_FORWARD, on
    try:
        return fs.flash_sigmoid(q, k, v, causal=causal, dropout_p=dropout_p)
    finally:
        fs.HOPPER_FORWARD = before


class DQSwitch(torch.autograd.Function):
    """flash_sigmoid's launchers (bias -log T) with dQ added by the dK/dV kernel's atomics (fused) or
    from its own kernel at every shape, whatever FUSE_DQ_MIN_HEAD_DIM and FUSE_DQ_MIN_T choose: the
    switch has to hold in the backward, which runs after flash_sigmoid has returned."""

    @staticmethod
    def forward(ctx, q, k, v, causal, dropout_p, fused):
        bias = torch.full((q.shape[1],), -math.log(q.shape[2]), device=q.device)
        seed = torch.randint(2**31, (1,), device=q.device) if dropout_p else None
        ctx.save_for_backward(q, k, v, bias, seed)
        ctx.args = dropout_p, causal, q.shape[-1] ** -0.5, fused
        return fs._launch_forward(q, k, v, bias, None, seed, dropout_p, causal, ctx.args[2])

    @staticmethod
    def backward(ctx, do):
        q, k, v, bias, seed = ctx.saved_tensors
        dropout_p, causal, scale, fused = ctx.args
        before = fs.FUSE_DQ_MIN_HEAD_DIM, fs.FUSE_DQ_MIN_T
        fs.FUSE_DQ_MIN_HEAD_DIM, fs.FUSE_DQ_MIN_T = (0, 0) if fused else (1 << 30, 1 << 30)
        try:
            dq, dk, dv, _ = fs._launch_backward(do.contiguous(), q, k, v, bias, None, seed, dropout_p, causal, scale,
                                                False)
        finally:
            fs.FUSE_DQ_MIN_HEAD_DIM, fs.FUSE_DQ_MIN_T = before
        return dq, dk, dv, None, None, None


def exact_sigmoid(q, k, v, causal, dropout_p):
    fs.FAST_SIGMOID = False  # tl.sigmoid: exp and divide instead of one tanh
    try:
        return fs.flash_sigmoid(q, k, v, causal=causal, dropout_p=dropout_p)
    finally:
        fs.FAST_SIGMOID = True


CUDA_GRAPHS = False  # --cuda-graphs: replay the calls from a CUDA graph, so host work drops out of the time


def time_ms(fn, warmup=25, rep=100):
    if CUDA_GRAPHS:  # no L2 flush between calls here, unlike do_bench
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_one(fn, B, H, T, D, causal, dropout_p):
    """(fwd ms, fwd+bwd ms, peak extra MiB of fwd+bwd) or None when it fails (out of memory, or a
    peer that cannot take dropout)."""
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    try:
        if fn(q, k, v, causal, dropout_p) is None:
            return None
        with torch.no_grad():
            fwd = time_ms(lambda: fn(q, k, v, causal, dropout_p))
        fwd_bwd = time_ms(lambda: torch.autograd.grad(fn(q, k, v, causal, dropout_p), (q, k, v), do))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(fn(q, k, v, causal, dropout_p), (q, k, v), do)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return fwd, fwd_bwd, peak
    except torch.OutOfMemoryError:
        return None
    except RuntimeError as e:  # a call that cannot be captured in a CUDA graph, or an SDPA backend refusing
        print(f"  failed: {' '.join(str(e).split())[:200]}")
        return None
    finally:
        torch.cuda.empty_cache()


def bench(args):
    impls = peers(args.ref_max_t, args.baseline)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    time_ms(lambda: a @ a)  # wake the GPU up to its clocks before the first timed kernel
    names = [n for n in args.impls.split(",") if n in impls]
    rows = []
    for D in args.head_dims:
        for T in args.seq_lens:
            for causal in (False, True):
                for dropout_p in args.dropouts:
                    B, H = max(1, args.tokens // T), args.heads
                    flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
                    for name in names:
                        fn, max_t = impls[name]
                        if max_t is not None and T > max_t:
                            continue
                        r = bench_one(fn, B, H, T, D, causal, dropout_p)
                        if r is None:
                            print(f"{name} D={D} T={T} causal={causal} dropout={dropout_p}: no result")
                            continue
                        fwd, fwd_bwd, peak = r
                        rows.append(dict(impl=name, D=D, T=T, causal=causal, dropout=dropout_p, fwd_ms=fwd,
                                         fwd_bwd_ms=fwd_bwd, fwd_tflops=flops / fwd / 1e9,
                                         fwd_bwd_tflops=3.5 * flops / fwd_bwd / 1e9, peak_mib=peak))
                        print(f"{name:20} D={D:3} T={T:5} causal={causal!s:5} dropout={dropout_p:<4} "
                              f"fwd {rows[-1]['fwd_tflops']:6.1f} fwd+bwd {rows[-1]['fwd_bwd_tflops']:6.1f} TFLOP/s  "
                              f"peak {peak:8.1f} MiB", flush=True)
    return rows


# Block shapes to try, (BLOCK_M, BLOCK_N, num_warps, num_stages). The forward and dQ walk keys for
# a query block (BLOCK_N must divide BLOCK_M for causal); dK/dV walks queries for a key block
# (BLOCK_M must divide BLOCK_N).
SWEEP = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3),
            (128, 128, 8, 3), (128, 64, 8, 4), (64, 32, 4, 3)],
    "dkdv": [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2),
             (32, 128, 8, 3), (16, 128, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 3),
             (32, 64, 8, 3), (64, 64, 8, 2)],
    "dq": [(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3),
           (128, 128, 8, 2), (64, 64, 4, 2), (128, 32, 8, 3)],
}
SWEEP_SHAPES = [(64, 1024, True), (64, 2048, True), (128, 1024, True), (128, 4096, False)]


KERNELS = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv_kernel", "dq": "_bwd_dq_kernel"}


def block_config(shape):
    m, n, warps, stages = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


def widen_autotune():
    """Let each kernel's autotuner choose among every SWEEP shape instead of its short list."""
    for name, attr in KERNELS.items():
        kernel = getattr(fs, attr)
        kernel.configs = [block_config(shape) for shape in SWEEP[name]]
        kernel.cache = {}


def autotune_choices():
    """Which config each kernel's autotuner chose, per tuning key (T, D, causal, alibi, dropout, fast, dtypes)."""
    lines = ["", "Autotuner choices (BLOCK_M, BLOCK_N, warps, stages) per key:", ""]
    for name, attr in KERNELS.items():
        for key, c in getattr(fs, attr).cache.items():
            lines.append(f"- {name} {key[:6]}: ({c.kwargs['BLOCK_M']}, {c.kwargs['BLOCK_N']}, {c.num_warps}, {c.num_stages})")
    return "\n".join(lines)


def sweep(args):
    """Time every SWEEP config of each kernel, to choose the autotune lists: the forward alone, the
    whole (fused) backward for each dK/dV config, and the deterministic backward for each dQ config
    (dK/dV at its first). TFLOP/s as in the table: 2 matmuls forward, 5 backward (the 2.5x convention)."""
    kernels = {name: getattr(fs, attr) for name, attr in KERNELS.items()}
    saved = {name: kernel.configs for name, kernel in kernels.items()}
    hopper_before, fs.HOPPER_FORWARD = fs.HOPPER_FORWARD, False  # the portable forward's configs, not the Gluon one
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    time_ms(lambda: a @ a)  # clocks up
    print("## sweep: TFLOP/s of one kernel per block config (BLOCK_M, BLOCK_N, warps, stages)")
    for D, T, causal in SWEEP_SHAPES:
        B, H = max(1, args.tokens // T), args.heads
        q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        bias = torch.full((H,), -math.log(T), device="cuda")
        scale, matmul = 1 / math.sqrt(D), 2 * B * H * T * T * D * (0.5 if causal else 1.0)
        fwd = lambda: torch.ops.flash_sigmoid.forward(q, k, v, bias, None, None, 0.0, causal, scale)
        bwd = lambda: torch.ops.flash_sigmoid.backward(do, q, k, v, bias, None, None, 0.0, causal, scale, False)
        for name, n_matmuls in (("fwd", 2), ("dkdv", 5), ("dq", 5)):
            results = []
            for shape in SWEEP[name]:
                m, n, w, s = shape
                if causal and (m % n if name != "dkdv" else n % m):
                    continue
                for other, kernel in kernels.items():  # this config for this kernel, the first for the others
                    kernel.configs = [block_config(shape)] \
                        if other == name else saved[other][:1]
                    kernel.cache = {}
                torch.use_deterministic_algorithms(name == "dq", warn_only=True)  # dQ's own kernel runs only then
                try:
                    ms = time_ms(fwd if name == "fwd" else bwd, warmup=10, rep=40)
                except Exception as e:  # out of shared memory: skip the shape
                    print(f"  {name} {shape}: failed ({type(e).__name__})")
                    continue
                finally:
                    torch.use_deterministic_algorithms(False)
                results.append((n_matmuls * matmul / ms / 1e9, shape))
            best = max(results, default=None)  # None when every shape failed
            print(f"D={D} T={T} causal={causal!s:5} {name:4}: " + "  ".join(
                f"{s}:{t:.0f}{'*' if (t, s) == best else ''}" for t, s in results), flush=True)
    for kernel, configs in zip(kernels.values(), saved.values()):
        kernel.configs, kernel.cache = configs, {}
    fs.HOPPER_FORWARD = hopper_before


def table(rows):
    """Markdown: our TFLOP/s, the ratio ours / the faster SDPA kernel (softmax), then ours / each peer,
    forward and forward+backward."""
    shape = lambda r: (r["D"], r["T"], r["causal"], r["dropout"])
    by_key = {(r["impl"],) + shape(r): r for r in rows}
    ours = [r for r in rows if r["impl"] == "flash_sigmoid"]
    others = sorted({r["impl"] for r in rows} - {"flash_sigmoid"}, key=[r["impl"] for r in rows].index)
    head = ("| D | T | causal | dropout | ours fwd | ours fwd+bwd | vs best SDPA fwd | vs best SDPA f+b | "
            + " | ".join(f"vs {n} fwd | vs {n} f+b" for n in others) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in ours:
        key = shape(r)
        sdpa_rows = [by_key[(n,) + key] for n in ("sdpa_cudnn", "sdpa_flash") if (n,) + key in by_key]
        cells = [str(key[0]), str(key[1]), "yes" if key[2] else "no", str(key[3]), f"{r['fwd_tflops']:.1f}",
                 f"{r['fwd_bwd_tflops']:.1f}"]
        for metric in ("fwd_tflops", "fwd_bwd_tflops"):
            best = max((p[metric] for p in sdpa_rows), default=None)
            cells.append(f"{r[metric] / best:.2f}x" if best else "")
        for n in others:
            p = by_key.get((n,) + key)
            cells += [f"{r['fwd_tflops'] / p['fwd_tflops']:.2f}x", f"{r['fwd_bwd_tflops'] / p['fwd_bwd_tflops']:.2f}x"] if p else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def raw_rows(rows):
    lines = ["Raw TFLOP/s (fwd / fwd+bwd) and peak extra MiB of one forward+backward:", ""]
    return "\n".join(lines + [f"- {r['impl']} D={r['D']} T={r['T']} causal={r['causal']} dropout={r['dropout']}: "
                              f"{r['fwd_tflops']:.1f} / {r['fwd_bwd_tflops']:.1f}, {r['peak_mib']:.0f} MiB" for r in rows])


def header():
    props = torch.cuda.get_device_properties(0)
    try:
        import triton_sigmoid
        ts = getattr(triton_sigmoid, "__version__", "?")
    except ImportError:
        ts = "not installed"
    cudnn = torch.backends.cudnn.version()
    return (f"{props.name}, {datetime.date.today()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"cuDNN {cudnn}, triton-sigmoid {ts}, commit {git_commit()}")


def git_commit():
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        return "?"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check-only", action="store_true", help="run the correctness check and stop")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1], help="attention dropout_p values")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--tokens", type=int, default=16384, help="B*T per shape")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ref-max-t", type=int, default=1024, help="longest T for the (T, T)-memory reference")
    p.add_argument("--baseline", default="", help="another flash_sigmoid.py to time as the peer 'baseline'")
    p.add_argument("--impls", default=DEFAULT_IMPLS, help="comma-separated implementations (also: "
                   "flash_sigmoid_exact, flash_sigmoid_hopper, flash_sigmoid_portable, flash_sigmoid_fused_dq, "
                   "flash_sigmoid_own_dq, torch_ref, torch_ref_compiled); "
                   "baseline needs --baseline")
    p.add_argument("--out", default="", help="write the markdown table to this file")
    p.add_argument("--sweep", action="store_true", help="time each kernel's candidate block shapes, then stop")
    p.add_argument("--wide-tune", action="store_true", help="autotune among all the --sweep shapes; print the choices")
    p.add_argument("--cuda-graphs", action="store_true", help="time graph replays: GPU time without the host's "
                   "per-call work (which dominates at T=1024)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_attention.py needs a CUDA GPU (the CPU tests are test_flash_sigmoid.py)")
    print(header())
    if not args.no_check and not check():
        print("warning: correctness check failed (see FAIL above); the timings below are of that kernel")
    if args.sweep:
        sweep(args)
    if args.check_only or args.sweep:
        raise SystemExit(0)
    if args.wide_tune:
        widen_autotune()
    CUDA_GRAPHS = args.cuda_graphs
    rows = bench(args)
    text = (f"# Attention benchmark\n\n{header()}\n\nCommand: `python benchmarks/bench_attention.py "
            f"{' '.join(sys.argv[1:])}`\n\n{raw_rows(rows)}\n{autotune_choices()}\n\n"
            f"TFLOP/s of flash_sigmoid and its ratio to each peer (softmax for SDPA; best SDPA = the faster of "
            f"cuDNN and flash for that row):\n\n{table(rows)}\n")
    print(text)  # the table last
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
