"""FlashSigmoid: fused sigmoid attention in Triton, forward and backward.

    O = sigmoid(scale * Q K^T + b) V

Sigmoid attention has no row normalisation, so unlike FlashAttention there is no running row max,
no row sum, no rescaling of the accumulator and no log-sum-exp to save for the backward pass:
each score becomes P = sigmoid(x) independently, through one hardware tanh
(sigmoid(x) = 0.5 * tanh(0.5 * x) + 0.5), and O accumulates P V.

Backward recomputes P from Q and K:
    dV = P^T dO     dP = dO V^T     dS = P * (1 - P) * dP     dQ = scale dS K     dK = scale dS^T Q
One program per key block accumulates dK and dV (over every query head of its group, for
grouped-query attention); a second kernel, one program per query block, recomputes P and
accumulates dQ in a fixed order (7 matmuls per tile). At head dim >= 128 and T >= 16384
(FUSE_DQ_MIN_*, where it measured faster) the first kernel instead adds its share of dQ into an
fp32 buffer with atomic adds: 5 matmuls per tile (S, dP, dV, dK, dQ), but atomic adds land in any
order, so dQ's last bits vary from run to run (never under torch.use_deterministic_algorithms(True)).

Attention dropout (training, as SDPA's dropout_p): P_drop = P * keep / (1 - p) with keep drawn by
an integer hash of (seed, batch*head, query, key), so the backward regenerates the forward's mask; then
O = P_drop V, dV = P_drop^T dO, dS = P (1 - P) * (dO V^T) * keep / (1 - p).

Layout: q (B, H, T, D), k and v (B, H_kv, T, D) with H a multiple of H_kv, last dim contiguous
(the layout of F.scaled_dot_product_attention). The output is (B, H, T, D) with the memory layout of
(B, T, H, D), as SDPA's. Head dims 16, 32, 64, 128. Any T.
"""
import inspect
import math
import os
from typing import Optional

import torch
from torch import Tensor

import flash_sigmoid_hopper

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch reference below still works
    triton = None

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
# dQ fused into the dK/dV kernel (atomic adds) from this head dim and this length up. The backward
# alone on an H200 against the two-kernel one (results/kernel_speed.md): at D=128 1.03-1.05x at
# T=16384, 0.85-1.00x at T 1024 to 8192 (causal or not, dropout 0 or 0.1); at D=64 0.78-0.98x.
# Below these the fp32 atomics cost more than the two matmuls they save.
FUSE_DQ_MIN_HEAD_DIM = 128
FUSE_DQ_MIN_T = 16384
# The Hopper forward (flash_sigmoid_hopper.py, Gluon) for the launches it supports (head dim 128,
# T >= 4096, no dropout or ALiBi). On by default with the Triton it was measured with, 3.6: 1.09-1.15x
# the portable forward on an H200 (results/kernel_speed.md). Triton 3.9's ptxas serialises its causal
# matrix multiplies (benchmarks/kernel_resources.py shows it), so other versions keep the portable
# kernel. FLASH_SIGMOID_HOPPER=1 or 0 forces it on or off.
HOPPER_TRITON = "3.6."
_hopper_switch = os.environ.get("FLASH_SIGMOID_HOPPER", "")
if _hopper_switch not in ("", "0", "1"):
    raise ValueError(f"FLASH_SIGMOID_HOPPER must be 1 (the Gluon forward on Hopper) or 0 (the portable one), "
                     f"got {_hopper_switch!r}: unset it for the default")
HOPPER_FORWARD = (_hopper_switch == "1" if _hopper_switch else
                  triton is not None and triton.__version__.startswith(HOPPER_TRITON))
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run on the CPU, no inline asm there
# tanh.approx.f32: one special-function op per score; the interpreter uses tl.sigmoid instead
FAST_SIGMOID = not INTERPRET


def sigmoid_attention_reference(q, k, v, causal=True, sigmoid_bias=None, scale=None, alibi_slopes=None,
                                dropout_p=0.0, dropout_keep=None):
    """Plain PyTorch sigmoid attention; materialises the (T_q, T_k) scores.

    q: (B, H, T_q, D); k, v: (B, H_kv, T_k, D) with H % H_kv == 0 (grouped-query attention).
    T_q < T_k (decoding with a KV cache) aligns the queries with the last T_q keys.
    sigmoid_bias: None (= -log T_k), a float, or a (H,) tensor (one learnable bias per head).
    alibi_slopes: None or a (H,) tensor; adds -slope_h * (i - j) to the score of query i, key j.
    dropout_p: drop each attention weight with this probability (scaling the rest by 1 / (1 - p));
    dropout_keep: a (B, H, T_q, T_k) bool mask to use instead of drawing one (tests: the kernel's mask).
    """
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    if H != H_kv:  # each group of H // H_kv query heads shares one key/value head
        k = k.repeat_interleave(H // H_kv, dim=1)
        v = v.repeat_interleave(H // H_kv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    bias = -math.log(T_k) if sigmoid_bias is None else sigmoid_bias
    if torch.is_tensor(bias):
        bias = bias.view(1, H, 1, 1)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = scale * (q @ k.transpose(-2, -1)).to(acc_dtype) + bias  # (B, H, T_q, T_k)
    i = torch.arange(T_k - T_q, T_k, device=q.device).view(-1, 1)  # query positions
    j = torch.arange(T_k, device=q.device).view(1, -1)  # key positions
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.view(1, H, 1, 1) * (i - j)
    if causal:
        scores = scores.masked_fill(j > i, float("-inf"))  # sigmoid(-inf) = 0
    probs = torch.sigmoid(scores)
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return (probs.to(v.dtype) @ v).to(q.dtype)


def kernel_available():
    return triton is not None and (torch.cuda.is_available() or INTERPRET)


def flash_sigmoid(q, k, v, causal=True, sigmoid_bias=None, scale=None, alibi_slopes=None, dropout_p=0.0,
                  dropout_seed=None):
    """Fused sigmoid attention with autograd; same arguments and result as the reference.

    dropout_seed: a (1,) int64 tensor on q's device for the dropout mask; None draws one from torch's
    generator (so torch.manual_seed makes runs repeat).
    """
    _check_inputs(q, k, v, sigmoid_bias, alibi_slopes)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_seed is not None and not (torch.is_tensor(dropout_seed) and dropout_seed.shape == (1,) and
                                         dropout_seed.dtype in (torch.int32, torch.int64) and dropout_seed.device == q.device):
        raise ValueError(f"dropout_seed must be a (1,) int64 tensor on {q.device}, e.g. torch.tensor([1234], device=q.device)")
    H, T, D = q.shape[1], q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if torch.is_tensor(sigmoid_bias):
        bias = sigmoid_bias.float().contiguous()  # the kernels read Bias + h
    else:
        b = -math.log(T) if sigmoid_bias is None else float(sigmoid_bias)
        bias = torch.full((H,), b, device=q.device, dtype=torch.float32)
    slopes = None if alibi_slopes is None else alibi_slopes.float().contiguous()
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(2**31, (1,), device=q.device) if dropout_seed is None else dropout_seed
    args = (q, k, v, bias, slopes, seed, float(dropout_p), bool(causal), scale)
    if torch.compiler.is_compiling():
        return torch.ops.flash_sigmoid.forward(*args)
    return _FlashSigmoid.apply(*args)


def _check_inputs(q, k, v, sigmoid_bias, alibi_slopes):
    """One clear ValueError for anything the kernel cannot take, before any launch."""
    if triton is None:
        raise ValueError("flash_sigmoid needs triton: pip install triton, or use sigmoid_attention_reference")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_sigmoid expects (B, H, T, D) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not q.is_cuda and not INTERPRET:
        raise ValueError(f"flash_sigmoid runs on CUDA tensors (got {q.device}); set TRITON_INTERPRET=1 "
                         "to run it on the CPU, or use sigmoid_attention_reference")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if INTERPRET and q.dtype == torch.bfloat16:
        raise ValueError("the Triton interpreter has no bfloat16: use float16 or float32 on the CPU")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k and v must be (B={B}, H_kv, T={T}, D={D}), got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H % k.shape[1] != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({k.shape[1]})")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported by flash_sigmoid (supported: {SUPPORTED_HEAD_DIMS}); "
                         "use sigmoid_attention_reference")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v need a contiguous last dim (stride 1): call .contiguous() first")
    for name, t in (("sigmoid_bias", sigmoid_bias), ("alibi_slopes", alibi_slopes)):
        if torch.is_tensor(t) and (t.shape != (H,) or t.device != q.device):
            raise ValueError(f"{name} must be a ({H},) tensor on {q.device}, got {tuple(t.shape)} on {t.device}")


if triton is not None:

    # Autotuned block shapes, (BLOCK_M, BLOCK_N, num_warps, num_stages). Causal needs the larger
    # block a multiple of the smaller one, so blocks meet the diagonal exactly. Forward and dQ walk
    # keys for a tall query block; dK/dV walks queries for a tall key block. Each candidate won at
    # least one shape of `python benchmarks/bench_attention.py --sweep` on an H100 (results/attention_h100.md):
    # small tiles on 4 warps win the forward nearly everywhere (64x32 even at D=128) and the backward
    # at D=64; 8-warp tiles win some backward shapes (dQ non-causal, dK/dV at D=128, T=4096).
    # The interpreter gets one small shape.
    # The dropout hash table's rows hold T rounded up to HASH_PAD positions: every tile divides it, so
    # tiles load their hashes without a bounds mask.
    HASH_PAD = tl.constexpr(128)

    def _configs(gpu_shapes, interpreter_shape):
        shapes = [interpreter_shape] if INTERPRET else gpu_shapes
        assert all(HASH_PAD.value % m == 0 and HASH_PAD.value % n == 0 for m, n, _, _ in shapes)
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]

    # 128x128 and 128x64 on 8 warps with deeper pipelines: candidates for D=128 on Hopper, where
    # a wider tile per program feeds the tensor cores better; no spills on sm_90 (kernel_resources.py)
    FWD_CONFIGS = _configs([(64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
                            (128, 64, 8, 4), (128, 128, 8, 3)], (32, 16, 4, 1))
    # with dQ fused in, the 4-warp dK/dV tiles spill at D=128 (benchmarks/kernel_resources.py); the
    # 8-warp 32x64 and 64x64 tiles do not
    DKDV_CONFIGS = _configs([(32, 64, 4, 3), (64, 64, 4, 2), (32, 128, 8, 3), (64, 128, 8, 3),
                             (32, 64, 8, 3), (64, 64, 8, 2)], (16, 32, 4, 1))
    DQ_CONFIGS = _configs([(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3)], (32, 16, 4, 1))
    TUNE_KEY = ["T", "HEAD_DIM", "CAUSAL", "HAS_ALIBI", "DROPOUT", "FAST"]
    # The winning config of each key is kept on disk beside Triton's compiled kernels
    # (~/.triton/cache; Triton >= 3.4), so a second process with the same shapes, as every run of an
    # ablation is, skips timing every candidate (the interpreter tunes anew each process)
    TUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}

    @triton.jit
    def _probs(s, qpos, kpos, half_scale, half_bias, half_slope, kept,
               MASK: tl.constexpr, HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, FAST: tl.constexpr):
        """P = sigmoid(scale*s + b - slope*(i-j)) = 0.5*tanh(0.5*(...)) + 0.5; masked where j > i;
        with DROPOUT, 0 where kept is False (unscaled: the kept ones' 1 / (1 - p) comes after the
        loop). A dropped P = 0 drops out of O and dV, and its P (1 - P) = 0 out of dS: one select.

        qpos and kpos broadcast to s's shape: (M, 1) and (1, N), or (1, M) and (N, 1) for s^T.
        """
        x = s * half_scale + half_bias  # one fma: scale and bias folded
        if HAS_ALIBI:
            x -= half_slope * (qpos - kpos).to(tl.float32)
        if FAST:
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x],
                                          dtype=tl.float32, is_pure=True, pack=1)
            p = 0.5 * t + 0.5
        else:
            p = tl.sigmoid(2.0 * x)
        if MASK:
            p = tl.where(qpos >= kpos, p, 0.0)
        if DROPOUT:
            p = tl.where(kept, p, 0.0)
        return p

    # Dropout mask: integer hashes instead of Philox. tl.rand runs Philox4x32-10 for each score (10
    # rounds of 2 mul.hi + 2 mul.lo + 4 xor/add: ~100 integer ops, 3 of its 4 words unused), 4-8x the
    # kernel's time. Below, each query and each key gets an odd 32-bit hash (computed once per call,
    # see the end of this comment), and a score's keep test multiplies the two: the high bits of a
    # product depend on every bit of both factors. Per score that is a multiply, a compare and a
    # select; the kept weights' 1 / (1 - p) scales the sums once, after the loop. (Adding the two
    # hashes instead would make every row's mask a shifted copy of every other's; multiplying passes
    # the same statistical checks as a full hash per score: keep rates, neighbours, row and column
    # correlations.)
    # A hash depends on (seed, batch*head, position) alone, so _hash_kernel computes them all once
    # per call into a table, and each tile loads its M + N of them: hashed in every tile, they cost
    # more instructions than the keep tests (benchmarks/kernel_resources.py --loop --dropout).
    @triton.jit
    def _mix32(x):
        """Wellons' lowbias32: a bijection of uint32 whose output bits each flip with about half the input bits."""
        x = (x ^ (x >> 16)) * 0x7FEB352D
        x = (x ^ (x >> 15)) * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _dropout_stream(Seed, bh):
        """The mask's key for one (batch, head): a hash of the 64-bit seed and batch*head."""
        seed = tl.load(Seed)
        key = _mix32(_mix32(seed.to(tl.uint32)) ^ (seed >> 32).to(tl.uint32))
        return _mix32(key + bh.to(tl.uint32))  # a bijection: distinct heads, distinct streams

    @triton.jit
    def _query_hash(stream, qpos):
        return _mix32(stream ^ qpos.to(tl.uint32)) | 1

    @triton.jit
    def _key_hash(stream, kpos):
        return _mix32(_mix32(stream) ^ kpos.to(tl.uint32)) | 1  # keys hash from a stream of their own

    @triton.jit
    def _hash_rows(Hashes, bh, T):
        """Head bh's row of query hashes and its row of key hashes in the (B*H, 2, T_pad) table, T_pad = T
        rounded up to a multiple of HASH_PAD."""
        t_pad = tl.cdiv(T, HASH_PAD) * HASH_PAD
        q_row = Hashes + bh * 2 * t_pad
        return q_row, q_row + t_pad

    @triton.jit
    def _hash_kernel(Seed, Hashes, T):
        """The table: _query_hash and _key_hash of positions 0 .. T_pad - 1 of head bh (grid: T_pad / HASH_PAD, B*H)."""
        bh = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * HASH_PAD + tl.arange(0, HASH_PAD)
        stream = _dropout_stream(Seed, bh)
        q_row, k_row = _hash_rows(Hashes, bh, T)
        tl.store(q_row + offs, _query_hash(stream, offs).to(tl.int32, bitcast=True))
        tl.store(k_row + offs, _key_hash(stream, offs).to(tl.int32, bitcast=True))

    @triton.jit
    def _load_hashes(row, offs):
        return tl.load(row + offs).to(tl.uint32, bitcast=True)

    @triton.jit
    def _kept(query_hash, key_hash, dropout_p):
        """Whether each weight is kept, from its query's and its key's hash broadcast against each other
        ((M, 1) and (1, N), or transposed): a function of (seed, batch*head, query, key) alone, so the
        forward and both backward kernels draw the same mask whatever their tiles. P(kept) = 1 - p to
        within 2^-32. tests/attention_float64.py rewrites it in torch."""
        return query_hash * key_hash >= tl.cast(dropout_p * 4294967296.0, tl.uint32)

    @triton.jit
    def _fwd_inner(acc, q, k_base, v_base, stride_kt, stride_vt, offs_m, lo, hi, T,
                   half_scale, half_bias, half_slope, k_hashes, q_hash, dropout_p,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, FAST: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            in_seq = offs_n < T  # keys past T load as zero, and zero V rows add nothing
            kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=in_seq[None, :], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
            s = tl.dot(q, kT)  # (BLOCK_M, BLOCK_N)
            kept = _kept(q_hash[:, None], _load_hashes(k_hashes, offs_n)[None, :], dropout_p) if DROPOUT else 0
            p = _probs(s, offs_m[:, None], offs_n[None, :], half_scale, half_bias, half_slope, kept,
                       MASK=MASK, HAS_ALIBI=HAS_ALIBI, DROPOUT=DROPOUT, FAST=FAST)
            acc = tl.dot(p.to(v.dtype), v, acc)
        return acc

    @triton.autotune(configs=FWD_CONFIGS, key=TUNE_KEY, **TUNE_CACHE)
    @triton.jit
    def _fwd_kernel(Q, K, V, O, Bias, Slopes, Hashes,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                    H, GROUP, T, scale, dropout_p,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, FAST: tl.constexpr):
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*T*D may pass 2^31
        b, h = bh // H, bh % H
        hk = h // GROUP  # the key/value head this query head reads
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=offs_m[:, None] < T, other=0.0)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        half_scale = 0.5 * scale
        half_bias = 0.5 * tl.load(Bias + h)
        half_slope = 0.5 * tl.load(Slopes + h) if HAS_ALIBI else 0.0
        q_hashes, k_hashes = _hash_rows(Hashes, bh, T)
        q_hash = _load_hashes(q_hashes, offs_m) if DROPOUT else 0
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # causal: the keys left of the diagonal block need no mask, the diagonal block does, none lie above it
        acc = _fwd_inner(acc, q, k_base, v_base, stride_kt, stride_vt, offs_m, 0, start_m if CAUSAL else T, T,
                         half_scale, half_bias, half_slope, k_hashes, q_hash, dropout_p, HEAD_DIM=HEAD_DIM,
                         BLOCK_N=BLOCK_N, MASK=False, HAS_ALIBI=HAS_ALIBI, DROPOUT=DROPOUT, FAST=FAST)
        if CAUSAL:
            acc = _fwd_inner(acc, q, k_base, v_base, stride_kt, stride_vt, offs_m, start_m,
                             tl.minimum(start_m + BLOCK_M, T), T, half_scale, half_bias, half_slope, k_hashes,
                             q_hash, dropout_p, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, MASK=True,
                             HAS_ALIBI=HAS_ALIBI, DROPOUT=DROPOUT, FAST=FAST)
        if DROPOUT:
            acc *= 1.0 / (1.0 - dropout_p)  # the kept weights' scale
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=offs_m[:, None] < T)

    @triton.jit
    def _dkdv_inner(dk, dv, db, k, v, q_base, do_base, dq_base, stride_qt, stride_dot, stride_dqt, offs_n, lo, hi, T,
                    dq_scale, half_scale, half_bias, half_slope, q_hashes, k_hash, dropout_p,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    BIAS_GRAD: tl.constexpr, DROPOUT: tl.constexpr, FAST: tl.constexpr, FUSE_DQ: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            in_seq = offs_m < T  # query rows past T load as zero: dO = 0 makes their dS zero
            qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=in_seq[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=in_seq[:, None], other=0.0)
            sT = tl.dot(k, qT)  # (BLOCK_N, BLOCK_M): scores transposed
            keptT = _kept(_load_hashes(q_hashes, offs_m)[None, :], k_hash[:, None], dropout_p) if DROPOUT else 0
            pT = _probs(sT, offs_m[None, :], offs_n[:, None], half_scale, half_bias, half_slope, keptT,
                        MASK=MASK, HAS_ALIBI=HAS_ALIBI, DROPOUT=DROPOUT, FAST=FAST)
            dv = tl.dot(pT.to(do.dtype), do, dv)
            dpT = tl.dot(v, tl.trans(do))
            dsT = pT * (1.0 - pT) * dpT  # sigmoid' = P (1 - P)
            dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
            if FUSE_DQ:  # this key block's share of dQ = scale dS K, added into fp32 rows other programs add to
                dq = tl.dot(tl.trans(dsT.to(k.dtype)), k) * dq_scale  # (BLOCK_M, HEAD_DIM)
                tl.atomic_add(dq_base + offs_m[:, None] * stride_dqt + offs_d[None, :], dq, mask=in_seq[:, None],
                              sem="relaxed")
            if BIAS_GRAD:
                db += tl.sum(tl.sum(dsT, axis=1), axis=0)
        return dk, dv, db

    # every candidate writes its own number of key-block rows of DBias, and adds into DQacc: zero
    # both before each try
    @triton.autotune(configs=DKDV_CONFIGS, key=TUNE_KEY + ["FUSE_DQ"], reset_to_zero=["DBias", "DQacc"],
                     **TUNE_CACHE)
    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DQacc, Bias, Slopes, Hashes, DBias,
                         stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                         stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                         stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                         stride_dqb, stride_dqh, stride_dqt,
                         H, GROUP, T, scale, dropout_p,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_GRAD: tl.constexpr,
                         DROPOUT: tl.constexpr, FAST: tl.constexpr, FUSE_DQ: tl.constexpr):
        """dK and dV of one key block (and with FUSE_DQ, its atomic share of dQ), over every query
        head of its group."""
        H_kv = H // GROUP
        start_n = tl.program_id(0) * BLOCK_N
        bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*T*D may pass 2^31
        b, hk = bh // H_kv, bh % H_kv
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=offs_n[:, None] < T, other=0.0)
        v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                    mask=offs_n[:, None] < T, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        half_scale = 0.5 * scale
        keep_scale = 1.0 / (1.0 - dropout_p) if DROPOUT else 1.0  # the kept weights' scale, left out of the sums
        for h in range(hk * GROUP, hk * GROUP + GROUP):  # every query head that shares this k, v
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DO + b * stride_dob + h * stride_doh
            dq_base = DQacc + b * stride_dqb + h * stride_dqh
            half_bias = 0.5 * tl.load(Bias + h)
            half_slope = 0.5 * tl.load(Slopes + h) if HAS_ALIBI else 0.0
            db = 0.0
            q_hashes, k_hashes = _hash_rows(Hashes, b * H + h, T)  # the query head's mask
            k_hash = _load_hashes(k_hashes, offs_n) if DROPOUT else 0
            # causal: the queries below the diagonal block need no mask, the diagonal block does, none lie above
            dk, dv, db = _dkdv_inner(dk, dv, db, k, v, q_base, do_base, dq_base, stride_qt, stride_dot, stride_dqt,
                                     offs_n, start_n + BLOCK_N if CAUSAL else 0, T, T, scale * keep_scale, half_scale,
                                     half_bias, half_slope, q_hashes, k_hash, dropout_p, HEAD_DIM=HEAD_DIM,
                                     BLOCK_M=BLOCK_M, MASK=False, HAS_ALIBI=HAS_ALIBI, BIAS_GRAD=BIAS_GRAD,
                                     DROPOUT=DROPOUT, FAST=FAST, FUSE_DQ=FUSE_DQ)
            if CAUSAL:
                dk, dv, db = _dkdv_inner(dk, dv, db, k, v, q_base, do_base, dq_base, stride_qt, stride_dot,
                                         stride_dqt, offs_n, start_n, start_n + BLOCK_N, T, scale * keep_scale,
                                         half_scale, half_bias, half_slope, q_hashes, k_hash, dropout_p,
                                         HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, MASK=True, HAS_ALIBI=HAS_ALIBI,
                                         BIAS_GRAD=BIAS_GRAD, DROPOUT=DROPOUT, FAST=FAST, FUSE_DQ=FUSE_DQ)
            if BIAS_GRAD:  # one partial sum per (batch, head, key block); the launcher adds them
                tl.store(DBias + (tl.program_id(0) * tl.num_programs(1) * GROUP) + b * H + h, db * keep_scale)
        tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
                 (dk * (scale * keep_scale)).to(DK.dtype.element_ty), mask=offs_n[:, None] < T)
        tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
                 (dv * keep_scale).to(DV.dtype.element_ty), mask=offs_n[:, None] < T)

    @triton.jit
    def _dq_inner(dq, q, do, k_base, v_base, stride_kt, stride_vt, offs_m, lo, hi, T,
                  half_scale, half_bias, half_slope, k_hashes, q_hash, dropout_p,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, FAST: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            in_seq = offs_n < T  # keys past T load as zero: V = 0 makes their dS zero
            kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=in_seq[None, :], other=0.0)
            vT = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None], mask=in_seq[None, :], other=0.0)
            s = tl.dot(q, kT)
            kept = _kept(q_hash[:, None], _load_hashes(k_hashes, offs_n)[None, :], dropout_p) if DROPOUT else 0
            p = _probs(s, offs_m[:, None], offs_n[None, :], half_scale, half_bias, half_slope, kept,
                       MASK=MASK, HAS_ALIBI=HAS_ALIBI, DROPOUT=DROPOUT, FAST=FAST)
            dp = tl.dot(do, vT)
            ds = p * (1.0 - p) * dp
            dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
        return dq

    @triton.autotune(configs=DQ_CONFIGS, key=TUNE_KEY, **TUNE_CACHE)
    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, DQ, Bias, Slopes, Hashes,
                       stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                       stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                       stride_dqb, stride_dqh, stride_dqt,
                       H, GROUP, T, scale, dropout_p,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, FAST: tl.constexpr):
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*T*D may pass 2^31
        b, h = bh // H, bh % H
        hk = h // GROUP
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=offs_m[:, None] < T, other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                     mask=offs_m[:, None] < T, other=0.0)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        half_scale = 0.5 * scale
        half_bias = 0.5 * tl.load(Bias + h)
        half_slope = 0.5 * tl.load(Slopes + h) if HAS_ALIBI else 0.0
        q_hashes, k_hashes = _hash_rows(Hashes, bh, T)
        q_hash = _load_hashes(q_hashes, offs_m) if DROPOUT else 0
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # causal: the keys left of the diagonal block need no mask, the diagonal block does, none lie above it
        dq = _dq_inner(dq, q, do, k_base, v_base, stride_kt, stride_vt, offs_m, 0, start_m if CAUSAL else T, T,
                       half_scale, half_bias, half_slope, k_hashes, q_hash, dropout_p, HEAD_DIM=HEAD_DIM,
                       BLOCK_N=BLOCK_N, MASK=False, HAS_ALIBI=HAS_ALIBI, DROPOUT=DROPOUT, FAST=FAST)
        if CAUSAL:
            dq = _dq_inner(dq, q, do, k_base, v_base, stride_kt, stride_vt, offs_m, start_m,
                           tl.minimum(start_m + BLOCK_M, T), T, half_scale, half_bias, half_slope, k_hashes,
                           q_hash, dropout_p, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, MASK=True, HAS_ALIBI=HAS_ALIBI,
                           DROPOUT=DROPOUT, FAST=FAST)
        if DROPOUT:
            scale *= 1.0 / (1.0 - dropout_p)  # the kept weights' scale
        tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=offs_m[:, None] < T)


def _output_like(q):
    """(B, H, T, D) laid out as (B, T, H, D) in memory, as SDPA returns it: the heads of a token side by
    side, so the caller's y.transpose(1, 2).contiguous().view(B, T, C) costs no copy."""
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2)


def _grad_like(x):
    """A gradient in its input's memory layout, as SDPA's backward gives it: for q, k, v sliced out of
    one qkv projection, the caller's concatenation of the three is then a plain copy, not a transpose.
    Contiguous when that layout would not keep the head dim innermost (e.g. an unfold view)."""
    g = torch.empty_like(x)
    return g if g.stride(-1) == 1 else torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _dropout_hashes(seed: Tensor, BH: int, T: int) -> Tensor:
    """(B*H, 2, T rounded up to HASH_PAD) int32: every query's and key's dropout hash (the uint32's bits),
    from which the kernels' tiles draw the mask."""
    blocks = triton.cdiv(T, HASH_PAD.value)
    hashes = torch.empty((BH, 2, blocks * HASH_PAD.value), device=seed.device, dtype=torch.int32)
    _hash_kernel[(blocks, BH)](seed, hashes, T)
    return hashes


def _launch_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, slopes: Optional[Tensor], seed: Optional[Tensor],
                    dropout_p: float, causal: bool, scale: float) -> Tensor:
    if HOPPER_FORWARD and FAST_SIGMOID and seed is None and slopes is None and flash_sigmoid_hopper.supports(q, k, v):
        return flash_sigmoid_hopper.forward(q, k, v, _output_like(q), bias, causal, scale)
    B, H, T, D = q.shape
    o = _output_like(q)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    hashes = bias if seed is None else _dropout_hashes(seed, B * H, T)
    # bias stands in for the pointers a launch without ALiBi or dropout never reads
    _fwd_kernel[grid](q, k, v, o, bias, bias if slopes is None else slopes, hashes,
                      *_strides(q), *_strides(k), *_strides(v), *_strides(o), H, H // k.shape[1], T, scale, dropout_p,
                      HEAD_DIM=D, CAUSAL=causal, HAS_ALIBI=slopes is not None, DROPOUT=seed is not None,
                      FAST=FAST_SIGMOID)
    return o


def _launch_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, slopes: Optional[Tensor],
                     seed: Optional[Tensor], dropout_p: float, causal: bool, scale: float,
                     bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv and d bias from dO, recomputing P = sigmoid(S) tile by tile from Q and K.

    What this backward does not need, and why: FlashAttention saves each row's log-sum-exp from its
    forward to rebuild P, and runs a preprocessing kernel for Delta_i = rowsum(dO_i * O_i), because
    softmax's derivative couples a row: dS = P * (dP - Delta). Sigmoid's derivative is elementwise,
    sigmoid' = P (1 - P), so dS = P (1 - P) dP needs only the score's own P and dP: nothing is saved
    from the forward but its inputs, and no pass over O runs first.

    dQ: added atomically by the dK/dV kernel at head dims >= FUSE_DQ_MIN_HEAD_DIM and T >= FUSE_DQ_MIN_T
    (5 matmuls, last bits not reproducible), else, and always when torch.are_deterministic_algorithms_enabled(),
    by its own kernel in a fixed order (7 matmuls).
    """
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    dq, dk, dv = _grad_like(q), _grad_like(k), _grad_like(v)
    common = dict(HEAD_DIM=D, CAUSAL=causal, HAS_ALIBI=slopes is not None, DROPOUT=seed is not None, FAST=FAST_SIGMOID)
    slopes = bias if slopes is None else slopes  # placeholder pointers for what the launch never reads
    hashes = bias if seed is None else _dropout_hashes(seed, B * H, T)  # the forward's, recomputed
    # (key blocks, B, H) partial sums of dS; sized for the smallest block, unused rows stay zero
    # without bias_grad an unwritten placeholder: no fill kernel to launch (host time counts at short T)
    dbias_partial = (torch.zeros if bias_grad else torch.empty)(
        (triton.cdiv(T, 16), B, H) if bias_grad else (1,), device=q.device, dtype=torch.float32)
    fuse_dq = D >= FUSE_DQ_MIN_HEAD_DIM and T >= FUSE_DQ_MIN_T and not torch.are_deterministic_algorithms_enabled()
    dq_acc = (torch.zeros if fuse_dq else torch.empty)(  # without fuse_dq an unwritten placeholder
        (B, H, T, D) if fuse_dq else (1, 1, 1), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H_kv)
    _bwd_dkdv_kernel[grid](q, k, v, do, dk, dv, dq_acc, bias, slopes, hashes, dbias_partial,
                           *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
                           *_strides(dq_acc), H, H // H_kv, T, scale, dropout_p, BIAS_GRAD=bias_grad,
                           FUSE_DQ=fuse_dq, **common)
    if fuse_dq:
        dq.copy_(dq_acc)
    else:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
        _bwd_dq_kernel[grid](q, k, v, do, dq, bias, slopes, hashes,
                             *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                             H, H // H_kv, T, scale, dropout_p, **common)
    dbias = dbias_partial.sum(dim=(0, 1)) if bias_grad else torch.empty_like(bias)  # unused: autograd gets None
    return dq, dk, dv, dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, slopes, seed, dropout_p, causal, scale = inputs
    ctx.save_for_backward(q, k, v, bias, slopes, seed)  # the seed regenerates the dropout mask
    ctx.dropout_p, ctx.causal, ctx.scale = dropout_p, causal, scale


def _backward_through(launch_backward):
    def backward(ctx, do):
        q, k, v, bias, slopes, seed = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv, dbias = launch_backward(do, q, k, v, bias, slopes, seed, ctx.dropout_p, ctx.causal,
                                            ctx.scale, ctx.needs_input_grad[3])
        return dq, dk, dv, dbias if ctx.needs_input_grad[3] else None, None, None, None, None, None
    return backward


class _FlashSigmoid(torch.autograd.Function):
    """Eager mode: the launchers under a plain autograd.Function, whose host work per call is well
    below the custom op's (results/ has the numbers); that matters at short T, where the GPU part
    takes tens of microseconds."""

    @staticmethod
    def forward(ctx, *inputs):
        _setup_context(ctx, inputs, None)
        return _launch_forward(*inputs)

    backward = staticmethod(_backward_through(_launch_backward))


# Under torch.compile the same launchers run as custom ops: one opaque node each, no graph break.
_forward_op = torch.library.custom_op("flash_sigmoid::forward", _launch_forward, mutates_args=())
_backward_op = torch.library.custom_op("flash_sigmoid::backward", _launch_backward, mutates_args=())


@_forward_op.register_fake
def _(q, k, v, bias, slopes, seed, dropout_p, causal, scale):
    return _output_like(q)


@_backward_op.register_fake
def _(do, q, k, v, bias, slopes, seed, dropout_p, causal, scale, bias_grad):
    return _grad_like(q), _grad_like(k), _grad_like(v), bias.new_empty(bias.shape)


torch.library.register_autograd("flash_sigmoid::forward", _backward_through(torch.ops.flash_sigmoid.backward),
                                setup_context=_setup_context)
