"""Causal self-attention, softmax or sigmoid: the only file that knows the attention kinds.

    softmax:  y = softmax(Q K^T / sqrt(d) + mask) V        (F.scaled_dot_product_attention)
    sigmoid:  y = sigmoid(Q K^T / sqrt(d) + b + mask) V    (b = -log(block_size) - 4 by default)

Sigmoid attention and its recipe (QK-norm, hybrid norm, LayerScale, b = -log n) follow Ramapuram et
al. 2024, "Theory, Analysis, and Best Practices for Sigmoid Self-Attention"; resolve_recipe says
what the defaults are. Positions: 'learned' (GPT-2's wpe, added in model.py), 'rope' (rotary, Su et
al. 2021) or 'alibi' (Press et al. 2022).
"""
import dataclasses
import math
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import flash_sigmoid
from configurable import ConfigError


# The bias of the default sigmoid, b = -log(n) - 4. The paper's -log(n) makes n zero scores sum to 1,
# as a softmax row does, so attention starts at softmax's size. With hybrid norm the output is
# normalised anyway, and b only sets how much weight the keys a query doesn't match keep: with -4,
# e^-4 ~ 2% of a weight among all n of them, a near-sparse start. Measured: within the noise of the
# best bias at blocks 64 and 256, better than -log(n) at 1024 (an offset of 5.6 was no better on the
# same seeds) and at 4096 better than 5.6 (results/sigmoid_vs_softmax.md).
HYBRID_BIAS_OFFSET = 4.0


def parse_sigmoid_bias(value):
    """'learnable' | '-log_n' | '-log_n-C' | a number (text or float) -> 'learnable' | ('-log_n', -C) | float
    ('auto' is default_sigmoid_bias's). -log_n follows the context length n = block_size, even when cropped."""
    if value == "learnable":
        return value
    rule = re.fullmatch(r"-log_n(?:-(\d+(?:\.\d*)?))?", str(value).strip())
    if rule:
        return ("-log_n", -float(rule.group(1) or 0.0))
    bias = float(value)  # ValueError for anything else
    if not math.isfinite(bias):
        raise ValueError(f"sigmoid_bias must be finite, got {value!r}")
    return bias


def default_sigmoid_bias(hybrid_norm):
    """What sigmoid_bias=auto means: -log_n-4 with hybrid norm (the sparse start above), else the paper's -log_n."""
    return f"-log_n-{HYBRID_BIAS_OFFSET:g}" if hybrid_norm else "-log_n"


def resolve_recipe(cfg):
    """cfg (a TrainConfig) with its recipe keys made concrete, as a GPTConfig needs them. By default
    (auto) --attn=sigmoid trains the paper's recipe with a sparser bias, the best measured here:
    QK-norm and RoPE (on for both kinds), hybrid norm (a LayerNorm on attention's output before the
    residual add) with LayerScale on both branches (starting at layerscale_init), and b = -log(n) - 4.
    Hybrid norm and LayerScale made softmax worse on every preset, so its auto is off."""
    sigmoid = cfg.attn == "sigmoid"
    hybrid_norm = sigmoid if cfg.hybrid_norm is None else cfg.hybrid_norm
    layerscale = sigmoid if cfg.layerscale is None else cfg.layerscale
    bias = default_sigmoid_bias(hybrid_norm) if cfg.sigmoid_bias == "auto" else cfg.sigmoid_bias
    return dataclasses.replace(cfg, hybrid_norm=hybrid_norm, layerscale=layerscale, sigmoid_bias=bias)


def triton_unusable_reason(head_dim, device="auto"):
    """Why the fused kernel can't run here, or None when it can."""
    interpret = flash_sigmoid.INTERPRET  # TRITON_INTERPRET=1 runs the kernel on the CPU
    if not interpret and str(device).split(":")[0] in ("cpu", "mps"):
        return f"device={device} is not CUDA"
    if not interpret and not torch.cuda.is_available():
        return "no CUDA GPU here"
    if not flash_sigmoid.kernel_available():
        return "the Triton kernel is not available (is triton installed?)"
    supported = flash_sigmoid.SUPPORTED_HEAD_DIMS
    if head_dim not in supported:
        return f"head dim n_embd/n_head = {head_dim} is not one of {supported}"
    return None


def check_attention_config(cfg):
    """Refuse attention settings that can't work; each ConfigError is one line saying how to fix it.

    cfg: a TrainConfig or GPTConfig. The sigmoid-only keys (sigmoid_bias, sigmoid_backend) are
    ignored with attn=softmax, so an ablation can flip attn alone, and a non-default one prints one
    warning line on stderr; sigmoid_bias must still be a valid value there, since a typo is a typo.
    """
    if cfg.attn not in ("softmax", "sigmoid"):
        raise ConfigError(f"--attn expects softmax or sigmoid, got {cfg.attn!r}")
    if cfg.pos_emb not in ("learned", "rope", "alibi"):
        raise ConfigError(f"--pos_emb expects learned, rope or alibi, got {cfg.pos_emb!r}")
    if cfg.n_head < 1 or cfg.n_embd % cfg.n_head:
        raise ConfigError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}: "
                          f"set --n_embd to a multiple of --n_head")
    n_kv_head = cfg.n_kv_head or cfg.n_head
    if cfg.n_kv_head < 0 or cfg.n_head % n_kv_head:
        raise ConfigError(f"n_head={cfg.n_head} is not a multiple of n_kv_head={cfg.n_kv_head}: "
                          f"set --n_kv_head to a divisor of n_head, or 0 for n_head")
    head_dim = cfg.n_embd // cfg.n_head
    if cfg.pos_emb == "rope" and head_dim % 2:
        raise ConfigError(f"rope needs an even head dim, got n_embd/n_head = {head_dim}: "
                          f"change --n_embd or --n_head, or use --pos_emb=learned")
    try:
        if cfg.sigmoid_bias != "auto":
            parse_sigmoid_bias(cfg.sigmoid_bias)
    except (TypeError, ValueError):
        raise ConfigError(f"--sigmoid_bias expects auto, learnable, -log_n, -log_n-C (C a number, e.g. "
                          f"-log_n-4) or a number like -5.5, got {cfg.sigmoid_bias!r}") from None
    unused = [f"--{key}={getattr(cfg, key)}" for key in ("sigmoid_bias", "sigmoid_backend") if getattr(cfg, key) != "auto"]
    if cfg.attn == "softmax" and unused:
        print(f"warning: {', '.join(unused)} ignored: for sigmoid attention only, and this is --attn=softmax", file=sys.stderr)
    if cfg.attn == "sigmoid" and cfg.sigmoid_backend == "triton":
        why = triton_unusable_reason(head_dim, getattr(cfg, "device", "auto"))
        if why:
            raise ConfigError(f"--sigmoid_backend=triton can't be used: {why}; use --sigmoid_backend=auto "
                              f"(the kernel where it can run, else torch) or --sigmoid_backend=torch")


def alibi_slopes(n_head):
    """ALiBi's per-head slopes: a geometric sequence starting at 2^(-8/n) (Press et al. 2022, Sec. 3)."""
    def power_of_2(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]
    if math.log2(n_head).is_integer():
        return torch.tensor(power_of_2(n_head))
    # not a power of 2: take the closest smaller power, then every other slope of the next one (as the paper's code)
    closest = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_head - closest])


def rope_cos_sin(block_size, head_dim, base=10000.0):
    """Rotary tables (block_size, head_dim): position p rotates pair (c, c + head_dim/2) by p * base^(-2c/head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(block_size).float(), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, hd) by the tables' rows for its T positions (cos, sin: (T, hd))."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def score_bias(T_q, T_k, slopes, device):
    """Additive score bias (1 or H, T_q, T_k): -inf where key j is after query i, and ALiBi's
    -slope_h * (i - j) when slopes is given. The queries are the last T_q of the T_k positions."""
    i = torch.arange(T_k - T_q, T_k, device=device).view(-1, 1)  # query positions
    j = torch.arange(T_k, device=device).view(1, -1)  # key positions
    bias = torch.zeros(1, T_q, T_k, device=device).masked_fill(j > i, float("-inf"))
    if slopes is not None:
        bias = bias - slopes.float().view(-1, 1, 1) * (i - j)
    return bias


class KVCache:
    """One layer's keys and values so far, for generation: k, v (B, n_kv_head, block_size, hd)."""

    def __init__(self, max_len):
        self.max_len, self.length = max_len, 0
        self.k = self.v = None  # allocated at the first append, in the keys' dtype and device

    def append(self, k, v):
        """Store k, v (B, n_kv_head, T, hd) after the cached ones; return all keys and values so far."""
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_zeros(B, H, self.max_len, D)
            self.v = v.new_zeros(B, H, self.max_len, D)
        assert self.length + T <= self.max_len, "KV cache is full: start a new one"
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        assert self.n_head % self.n_kv_head == 0
        self.head_dim = config.n_embd // config.n_head
        self.attn, self.pos_emb, self.backend = config.attn, config.pos_emb, config.sigmoid_backend
        self.block_size, self.dropout = config.block_size, config.dropout
        # q, k and v in one matmul; with n_kv_head == n_head this is GPT-2's c_attn
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # QK-norm (the sigmoid-attention paper's recipe): bounds the scores, which keeps early sigmoid attention stable
        self.q_norm = nn.LayerNorm(self.head_dim, bias=config.bias) if config.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, bias=config.bias) if config.qk_norm else nn.Identity()
        # with QK-norm a score q.k/sqrt(hd) is at most sqrt(hd) (LayerNorm gains at 1): a learned per-head
        # factor on the scores, starting at 1, lifts that ceiling faster than the per-channel gains
        self.qk_scale = nn.Parameter(torch.ones(self.n_head)) if config.qk_scale == "learnable" else None
        if self.pos_emb == "rope":  # tables are derived, not learned: kept out of the state dict
            cos, sin = rope_cos_sin(config.block_size, self.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if self.pos_emb == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(self.n_head), persistent=False)
        # backend 'auto' uses the kernel for CUDA inputs when it is there and fits the head dim
        self.kernel_fits = flash_sigmoid.kernel_available() and self.head_dim in flash_sigmoid.SUPPORTED_HEAD_DIMS
        self.bias_offset = None  # b = -log(block_size) + bias_offset when the bias follows the context length
        self.sigmoid_bias = None
        if self.attn == "sigmoid":  # only sigmoid has the bias: an unused parameter would upset DDP
            auto = parse_sigmoid_bias(default_sigmoid_bias(config.hybrid_norm))
            bias = auto if config.sigmoid_bias == "auto" else parse_sigmoid_bias(config.sigmoid_bias)
            if bias == "learnable":  # one per head, starting where the default bias is
                start = -math.log(config.block_size) + auto[1]
                self.sigmoid_bias = nn.Parameter(torch.full((self.n_head,), start))
            elif isinstance(bias, tuple):  # -log(block_size), not -log(T): a token's output must not depend on T
                self.bias_offset = bias[1]
                self.sigmoid_bias = -math.log(config.block_size) + self.bias_offset
            else:
                self.sigmoid_bias = bias
        self.record_norm = False  # set True to keep last_out_norm (train.py's --log_attn_norm)
        self.last_out_norm = None

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()  # batch size, sequence length, embedding width (n_embd)
        hd, n_kv = self.head_dim, self.n_kv_head
        q, k, v = self.c_attn(x).split([self.n_head * hd, n_kv * hd, n_kv * hd], dim=2)
        q = self.q_norm(q.view(B, T, self.n_head, hd).transpose(1, 2))  # (B, nh, T, hd)
        k = self.k_norm(k.view(B, T, n_kv, hd).transpose(1, 2))  # (B, n_kv, T, hd)
        v = v.view(B, T, n_kv, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        start = kv_cache.length if kv_cache is not None else 0  # absolute position of x's first token
        if self.pos_emb == "rope":
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.qk_scale is not None:
            q = q * self.qk_scale.view(1, -1, 1, 1)  # (B, nh, T, hd): scales every score of head h
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, n_kv, start + T, hd): every key so far
        y = self.softmax_attention(q, k, v) if self.attn == "softmax" else self.sigmoid_attention(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        if self.record_norm:  # detached and left on the device: no host sync until train.py reads it
            self.last_out_norm = y.detach().float().norm(dim=-1).mean()
        return self.resid_dropout(self.c_proj(y))

    def softmax_attention(self, q, k, v):
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        T_q, T_k = q.size(2), k.size(2)
        if self.pos_emb != "alibi" and T_q == T_k:  # the common case: let SDPA pick a flash kernel
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
        # ALiBi, or decoding with a cache (is_causal would align the queries with the first keys)
        slopes = self.alibi_slopes if self.pos_emb == "alibi" else None
        mask = score_bias(T_q, T_k, slopes, q.device).to(q.dtype).unsqueeze(0)  # (1, 1 or nh, T_q, T_k)
        if gqa:  # SDPA's enable_gqa with a mask falls back to its O(T^2)-memory math kernel
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, T_k, hd)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def sigmoid_attention(self, q, k, v):
        # dropout on the attention weights, as softmax's SDPA call: both kinds regularise alike
        slopes = self.alibi_slopes.float() if self.pos_emb == "alibi" else None
        dropout_p = self.dropout if self.training else 0.0
        args = dict(causal=True, sigmoid_bias=self.sigmoid_bias, alibi_slopes=slopes, dropout_p=dropout_p)
        fused = self.backend == "triton" or (self.backend == "auto" and q.is_cuda and self.kernel_fits)
        if fused and q.size(2) == k.size(2):  # decoding (fewer queries than keys) uses the reference
            # under autocast QK-norm's LayerNorm returns float32 while v is bf16: one dtype for the kernel
            return flash_sigmoid.flash_sigmoid(q.to(v.dtype), k.to(v.dtype), v, **args)
        return flash_sigmoid.sigmoid_attention_reference(q, k, v, **args)

    def crop_block_size(self, block_size):
        """Shorten the context (model.crop_block_size); a -log_n sigmoid bias follows -log(block_size)."""
        self.block_size = block_size
        if self.pos_emb == "rope":
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]
        if self.bias_offset is not None:
            self.sigmoid_bias = -math.log(block_size) + self.bias_offset
