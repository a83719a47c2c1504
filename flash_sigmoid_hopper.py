"""FlashSigmoid's forward for Hopper (sm_90), in Gluon: the same O = sigmoid(scale * Q K^T + b) V as
flash_sigmoid.py's portable kernel, with the one overlap its compiler does not give.

Per key tile the portable kernel runs S = Q K^T on the tensor cores, then P = sigmoid(S) on the
other units, then O += P V: the tensor cores wait while the tanh runs. Written rotated in Triton
(S of the next tile first), Triton 3.6 and 3.9 still wait for every matrix multiply right after
issuing the next S (their sm_90 TTGIR), so nothing overlaps. Gluon exposes Hopper's asynchronous
matrix multiply (wgmma) and its wait: `warpgroup_mma_wait(1)` waits until at most one is still
running, and they finish in the order issued. So each tile j:

    issue S_{j+1} = Q K_{j+1}^T      (async)
    wait(1)                          P_{j-1} V_{j-1} done: its V slot and P registers are free
    refill K_{j+2}, V_{j+1} by TMA   (two-slot rings, an mbarrier per slot)
    P_j = sigmoid(S_j)               on the CUDA cores, while the tensor cores compute S_{j+1}
    issue O += P_j V_j               (async)
    wait(1)                          S_{j+1} done; P_j V_j may still run into the next tile

One warp group (4 warps) per 64 query rows won at head dim 128: 128-row tiles on 8 warps and
128-wide key tiles measured slower. No dropout and no ALiBi here (those launches stay portable);
the backward is the portable one (it needs nothing from the forward but its inputs). flash_sigmoid.py
takes it by default with Triton 3.6 (FLASH_SIGMOID_HOPPER=0 or 1 forces it); results/kernel_speed.md
has what it measured.
"""
import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma, warpgroup_mma_init,
                                                                  warpgroup_mma_wait)
except ImportError:  # no Triton, or one without Gluon: the portable kernel serves every launch
    gluon = None

BLOCK_M, BLOCK_N, NUM_WARPS = 64, 64, 4
# where it measured level with the portable kernel (T = 4096) or faster (T = 16384): head dim 128;
# at head dim 64 it was level at best; T = 1024 is not measured
HEAD_DIMS, MIN_T = (128,), 4096


def supports(q, k, v):
    """Whether to take the Gluon forward for these tensors: a Hopper GPU, fp16 or bf16, a head dim and
    length from above, and what TMA needs (16-byte aligned bases and row strides, head dim contiguous)."""
    if gluon is None or not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in HEAD_DIMS or q.shape[2] < MIN_T:
        return False
    aligned = lambda t: (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
                         and all(s % 8 == 0 for s in (t.stride(0), t.stride(1), t.stride(2))))  # 8 x 2 bytes
    return aligned(q) and aligned(k) and aligned(v)


def forward(q, k, v, o, bias, causal, scale):
    """Writes O into o (B, H, T, D), as flash_sigmoid's forward; bias: (H,) float32."""
    # the kernel makes its TMA descriptors on the GPU, in scratch memory Triton asks torch for; set
    # on every call: Triton keeps the allocator per thread (autograd may run a recompute in another)
    triton.set_allocator(_scratch)
    B, H, T, D = q.shape
    st = lambda t: (t.stride(0), t.stride(1), t.stride(2))
    _fwd_kernel[(triton.cdiv(T, BLOCK_M), B * H)](
        q, k, v, o, bias, *st(q), *st(k), *st(v), *st(o), H, H // k.shape[1], T, scale,
        HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=causal, num_warps=NUM_WARPS)
    return o


def _scratch(size, align, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


if gluon is not None:
    # Triton 3.6 names the TMA load async_copy_global_to_shared; later versions, async_load
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared

    @gluon.jit
    def _probs(s, rows, start_n, half_scale, half_bias, BLOCK_N: gl.constexpr, MASK: gl.constexpr,
               layout: gl.constexpr):
        """P = 0.5 * tanh(0.5 * (scale * S + b)) + 0.5, 0 above the diagonal when MASK."""
        x = s * half_scale + half_bias
        t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)
        p = 0.5 * t + 0.5
        if MASK:
            cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
            p = gl.where(gl.expand_dims(rows, 1) >= gl.expand_dims(cols, 0), p, 0.0)
        return p

    @gluon.jit
    def _fwd_kernel(Q, K, V, O, Bias, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, H, GROUP, T, scale,
                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                    num_warps: gl.constexpr):
        dtype: gl.constexpr = Q.dtype.element_ty
        start_m = gl.program_id(0) * BLOCK_M
        bh = gl.program_id(1).to(gl.int64)
        b = bh // H
        h = bh % H
        hk = h // GROUP  # the key/value head this query head reads
        # S and O live in registers as wgmma accumulators (warps stacked along the rows); P is wgmma's
        # register operand; Q, K and V tiles sit in shared memory in the layout wgmma and TMA share
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        kv_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_desc = tma.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, [T, HEAD_DIM], [stride_qt, 1],
                                            [BLOCK_M, HEAD_DIM], q_smem_layout)  # rows past T read as zeros
        k_desc = tma.make_tensor_descriptor(K + b * stride_kb + hk * stride_kh, [T, HEAD_DIM], [stride_kt, 1],
                                            [BLOCK_N, HEAD_DIM], kv_smem_layout)
        v_desc = tma.make_tensor_descriptor(V + b * stride_vb + hk * stride_vh, [T, HEAD_DIM], [stride_vt, 1],
                                            [BLOCK_N, HEAD_DIM], kv_smem_layout)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_smem_layout)
        k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], kv_smem_layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], kv_smem_layout)
        bars = gl.allocate_shared_memory(gl.int64, [5, 1], mbarrier.MBarrierLayout())  # Q, K slots 0-1, V slots 0-1
        for i in gl.static_range(5):
            mbarrier.init(bars.index(i), count=1)
        tile_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * dtype.primitive_bitwidth // 8

        # key tiles 0 .. n-1; keys past T load as zeros, and zero V rows add nothing
        n = gl.cdiv(gl.minimum(start_m + BLOCK_M, T) if CAUSAL else T, BLOCK_N)
        mbarrier.expect(bars.index(0), BLOCK_M * HEAD_DIM * dtype.primitive_bitwidth // 8)
        _tma_load(q_desc, [start_m, 0], bars.index(0), q_smem)
        for i in gl.static_range(2):
            mbarrier.expect(bars.index(1 + i), tile_bytes, pred=i < n)
            _tma_load(k_desc, [i * BLOCK_N, 0], bars.index(1 + i), k_smem.index(i), pred=i < n)
        mbarrier.expect(bars.index(3), tile_bytes)
        _tma_load(v_desc, [0, 0], bars.index(3), v_smem.index(0))

        rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        half_scale = 0.5 * scale
        half_bias = 0.5 * gl.load(Bias + h)
        no_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)  # use_acc=False: S starts from zero
        acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout))
        p_prev = gl.zeros([BLOCK_M, BLOCK_N], dtype, p_layout)
        mbarrier.wait(bars.index(0), 0)
        mbarrier.wait(bars.index(1), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), no_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        for j in range(0, n):
            slot = j % 2
            other = 1 - slot
            # S_{j+1}; after the last tile from a stale slot: computed, never used
            mbarrier.wait(bars.index(1 + other), ((j + 1) // 2) & 1, pred=j + 1 < n)
            s_next = warpgroup_mma(q_smem, k_smem.index(other).permute((1, 0)), no_s, use_acc=False, is_async=True)
            acc, p_prev = warpgroup_mma_wait(1, deps=(acc, p_prev))
            mbarrier.expect(bars.index(1 + slot), tile_bytes, pred=j + 2 < n)
            _tma_load(k_desc, [(j + 2) * BLOCK_N, 0], bars.index(1 + slot), k_smem.index(slot), pred=j + 2 < n)
            mbarrier.expect(bars.index(3 + other), tile_bytes, pred=j + 1 < n)
            _tma_load(v_desc, [(j + 1) * BLOCK_N, 0], bars.index(3 + other), v_smem.index(other), pred=j + 1 < n)
            if CAUSAL and (j + 1) * BLOCK_N > start_m:  # only the tiles that reach the diagonal are masked
                p = _probs(s, rows, j * BLOCK_N, half_scale, half_bias, BLOCK_N, True, s_layout)
            else:
                p = _probs(s, rows, j * BLOCK_N, half_scale, half_bias, BLOCK_N, False, s_layout)
            p = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.wait(bars.index(3 + slot), (j // 2) & 1)
            acc = warpgroup_mma(p, v_smem.index(slot), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_next,))
            p_prev = p
        acc = warpgroup_mma_wait(0, deps=(acc,))
        for i in gl.static_range(5):
            mbarrier.invalidate(bars.index(i))
        out_rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        ptrs = O + b * stride_ob + h * stride_oh + gl.expand_dims(out_rows, 1) * stride_ot + gl.expand_dims(cols, 0)
        gl.store(ptrs, acc.to(dtype), mask=gl.expand_dims(out_rows, 1) < T)
