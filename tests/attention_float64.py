"""What flash_sigmoid's tests and benchmarks/bench_attention.py check the kernel against, written
from the formulas alone: sigmoid attention in float64, the kernel's dropout mask rewritten in plain
torch, and the relative error of a result."""
import math

import torch


def sigmoid_attention_f64(q, k, v, causal, bias, alibi_slopes=None):
    """O[b,h,i] = sum_j sigmoid(q_i.k_j / sqrt(D) + b_h - slope_h (i - j)) v_j, over j <= i when causal."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    B, H, T, D = q.shape
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    pos = torch.arange(T, dtype=torch.float64)
    bias = torch.as_tensor(bias, dtype=torch.float64).cpu()
    x = q @ k.transpose(-1, -2) / math.sqrt(D) + bias.view(1, H, 1, 1)
    if alibi_slopes is not None:
        x = x - alibi_slopes.double().cpu().view(1, H, 1, 1) * (pos[:, None] - pos[None, :])
    p = 1.0 / (1.0 + torch.exp(-x))
    if causal:
        p = p * (pos[None, :] <= pos[:, None])
    return p @ v


def rel_err(a, b):
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


U32 = 0xFFFFFFFF  # the kernel's uint32 arithmetic, here on int64 tensors reduced modulo 2^32


def _mul32(x, c):
    """x * c mod 2^32, in two 16-bit halves of c so that no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & U32


def _mix32(x):
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def dropout_hashes(seed, B, H, T):
    """flash_sigmoid's _query_hash and _key_hash of positions 0 .. T - 1 for a (1,) int64 seed tensor,
    rewritten in torch: two (B, H, T) int64 tensors of uint32 values, on the CPU."""
    seed = int(seed.item())
    key = _mix32(_mix32(torch.tensor(seed & U32)) ^ (seed >> 32))
    stream = _mix32((key + torch.arange(B * H)) & U32).view(B, H, 1)  # one per (batch, head)
    positions = torch.arange(T)
    return _mix32(stream ^ positions) | 1, _mix32(_mix32(stream) ^ positions) | 1


def dropout_keep_mask(seed, B, H, T, dropout_p):
    """flash_sigmoid's dropout mask for a (1,) int64 seed tensor, from its hashes (dropout_hashes,
    _kept) rewritten in torch: (B, H, T, T) bool on the CPU, True = kept."""
    query_hash, key_hash = dropout_hashes(seed, B, H, T)
    x = _mul32(query_hash.unsqueeze(-1), key_hash.unsqueeze(-2))  # (B, H, T, T): their product mod 2^32
    threshold = int(torch.tensor(dropout_p, dtype=torch.float32).item() * 2**32)  # the kernel's fp32 p
    return x >= threshold
