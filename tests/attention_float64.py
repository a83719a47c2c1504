"""What flash_sigmoid's tests and benchmarks/bench_attention.py check the kernel against, written
from the formulas alone: sigmoid attention in float64 and the relative error of a result."""
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
