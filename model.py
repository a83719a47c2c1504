"""A GPT language model, after nanoGPT's model.py, with a choice of attention (see attention.py).

Beyond GPT-2: sigmoid attention, grouped-query attention, QK-norm and RoPE (on by default, for both
attention kinds: the sigmoid recipe's), LayerScale and hybrid norm (on by default for sigmoid only),
ALiBi, and a KV cache for generation.
References: GPT-2 (Radford et al. 2019), nanoGPT (Karpathy), sigmoid attention (Ramapuram et al. 2024),
LayerScale (Touvron et al. 2021, CaiT).
"""
import inspect
import math
import pickle
import zipfile
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import CausalSelfAttention, KVCache, resolve_recipe
from configurable import ConfigError


class ModelLoadError(RuntimeError):
    """A checkpoint or pretrained weights can't be loaded; the message is one line saying why."""


# model keys added after checkpoints were written without them, with the value that means the old model
LATER_KEYS = {"qk_scale": "fixed"}
# model values whose spelling changed: sigmoid_bias 'auto' in a checkpoint meant -log(block_size)
OLD_VALUES = {("sigmoid_bias", "auto"): "-log_n"}


def checkpoint_model_args(ckpt):
    """A checkpoint's GPTConfig fields, in today's spelling (LATER_KEYS and OLD_VALUES)."""
    args = {**LATER_KEYS, **(ckpt.get("model_args") or {})}
    return {k: OLD_VALUES.get((k, v), v) if isinstance(v, str) else v for k, v in args.items()}


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257  # the tokenizer's; the embedding is padded to a multiple of 64 inside GPT
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0  # 0 = n_head; fewer = grouped-query attention
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    attn: str = "softmax"  # softmax | sigmoid
    sigmoid_bias: str = "auto"  # auto (-log_n-4 with hybrid norm, else -log_n) | -log_n-C | learnable | a number
    sigmoid_backend: str = "auto"  # auto | triton | torch
    qk_norm: bool = True  # the sigmoid recipe's, for both kinds (GPT-2 has none)
    qk_scale: str = "fixed"  # fixed (1/sqrt(head_dim)) | learnable (times a learned per-head factor)
    layerscale: bool = False
    layerscale_init: float = 0.1
    hybrid_norm: bool = False
    pos_emb: str = "rope"  # rope | learned (GPT-2's) | alibi

    @classmethod
    def from_train_config(cls, cfg, vocab_size):
        """The model's keys picked out of a TrainConfig, its auto recipe keys made concrete
        (vocab_size comes from the dataset)."""
        cfg = resolve_recipe(cfg)
        return cls(vocab_size=vocab_size, **{f.name: getattr(cfg, f.name) for f in fields(cls) if f.name != "vocab_size"})


class LayerScale(nn.Module):
    """x * gamma with a learned per-channel gamma starting small, so each residual branch starts
    near zero and the block near the identity (CaiT; the sigmoid-attention paper's recipe)."""

    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.ln_1 = nn.LayerNorm(C, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        # hybrid norm: x + norm(attn(norm(x))), bounding what attention adds to the stream (paper's recipe)
        self.ln_attn = nn.LayerNorm(C, bias=config.bias) if config.hybrid_norm else nn.Identity()
        self.ls_1 = LayerScale(C, config.layerscale_init) if config.layerscale else nn.Identity()
        self.ln_2 = nn.LayerNorm(C, bias=config.bias)
        self.mlp = MLP(config)
        self.ls_2 = LayerScale(C, config.layerscale_init) if config.layerscale else nn.Identity()

    def forward(self, x, kv_cache=None):
        x = x + self.ls_1(self.ln_attn(self.attn(self.ln_1(x), kv_cache)))
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        # pad the vocab to a multiple of 64 for faster matmuls (nanoGPT: 50257 -> 50304, ~25% faster);
        # logits are cut back to vocab_size, so no loss or sample ever sees a padding id
        self.padded_vocab_size = (config.vocab_size + 63) // 64 * 64
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(self.padded_vocab_size, config.n_embd)))
        if config.pos_emb == "learned":  # rope and alibi act inside attention instead
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.drop = nn.Dropout(config.dropout)
        self.transformer.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.transformer.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, self.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, https://paperswithcode.com/method/weight-tying
        self.chunked_loss = True  # the loss by linear_cross_entropy; False: F.cross_entropy on all the logits

        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections, per GPT-2 paper
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without the position embeddings (the token embeddings count,
        as they are the lm_head's weights too)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, kv_caches=None, all_logits=False):
        """idx (B, T) token ids -> (logits, loss). With targets (B, T): (None, mean cross-entropy over
        the targets that are not -1), without ever holding the (B, T, vocab) logits. Without targets:
        the last position's logits (B, 1, vocab_size), or every position's (B, T, vocab_size) with
        all_logits. kv_caches: one attention.KVCache per layer, for generate."""
        B, T = idx.size()
        start = kv_caches[0].length if kv_caches else 0  # position of idx's first token
        assert start + T <= self.config.block_size, f"sequence of {start + T} > block_size {self.config.block_size}"
        x = self.transformer.wte(idx)  # token embeddings (B, T, n_embd)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))  # (T, n_embd)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_caches[i] if kv_caches else None)
        x = self.transformer.ln_f(x)
        V = self.config.vocab_size
        if targets is not None:
            if not self.chunked_loss:  # the plain path, kept to compare against (bench_train.py --losses)
                logits = self.lm_head(x)[..., :V]  # (B, T, vocab_size)
                return None, F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
            rows = max(1, 2**27 // self.padded_vocab_size)  # logits per chunk <= 2^27 (GPT-2 124M: 2668 rows)
            return None, linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), V, rows)
        if not all_logits:  # inference: only the last position is needed
            x = x[:, [-1], :]  # (B, 1, n_embd); the list index keeps the time dim
        return self.lm_head(x)[..., :V], None

    def record_attn_norms(self, on=True):
        """Make every attention layer keep its output's mean L2 norm per token (--log_attn_norm).
        Set it once before training: flipping it makes torch.compile recompile."""
        for block in self.transformer.h:
            block.attn.record_norm = on

    def attn_out_norms(self):
        """The norms the last forward recorded, one float per layer (one host sync)."""
        return torch.stack([block.attn.last_out_norm for block in self.transformer.h]).tolist()

    def crop_block_size(self, block_size):
        """Shorten the context, e.g. GPT-2's 1024 to a smaller block_size for finetuning."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            block.attn.crop_block_size(block_size)

    @classmethod
    def from_checkpoint(cls, ckpt, override_args=None):
        """The model a train.py checkpoint describes: ckpt["model_args"] (GPTConfig's fields) and
        ckpt["model"] (its state dict). override_args: keys that don't change the weights, such as
        sigmoid_backend or dropout. Raises ModelLoadError (one line) for a checkpoint that doesn't fit."""
        if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
            raise ModelLoadError("not a train.py checkpoint (no model_args or model): check the path")
        model_args = checkpoint_model_args(ckpt)
        expected, got = {f.name for f in fields(GPTConfig)}, set(model_args)
        if got != expected:
            raise ModelLoadError(f"checkpoint is from another model version (model_args unknown: {sorted(got - expected)}, "
                                 f"missing: {sorted(expected - got)}): use the code that wrote it, or train again")
        model = cls(GPTConfig(**{**model_args, **(override_args or {})}))
        # torch.compile saves the weights under '_orig_mod.'
        state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
        own = model.state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        reshaped = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
        if missing or unexpected or reshaped:
            problems = [f"{len(ks)} {what} (e.g. {ks[0]})" for what, ks in
                        (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if ks]
            raise ModelLoadError(f"checkpoint weights don't fit its model_args: {', '.join(problems)}; "
                                 f"it comes from another architecture or code version")
        model.load_state_dict(state)
        return model

    @classmethod
    def from_pretrained(cls, model_type, override_args=None):
        """OpenAI's GPT-2 weights via Hugging Face transformers (pip install transformers; network or
        a local HF cache). override_args: dropout, a smaller block_size (cropped), and any other key
        only if it equals GPT-2's, so that sigmoid attention, alibi... are refused in one line. This
        project's default rope and qk_norm become GPT-2's learned positions and no QK-norm, with a note."""
        shapes = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),  # n_layer, n_head, n_embd
                  "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}  # 124M, 350M, 774M, 1558M params
        if model_type not in shapes:
            raise ModelLoadError(f"unknown GPT-2 model {model_type!r}: use one of {', '.join(shapes)}")
        n_layer, n_head, n_embd = shapes[model_type]
        args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257, block_size=1024, bias=True,
                    pos_emb="learned", qk_norm=False)
        gpt2 = GPTConfig(**args)
        override_args = dict(override_args or {})
        # this project's defaults (rope, qk_norm) don't fit GPT-2's weights: take GPT-2's, and say so
        swapped = []
        for key, default, gpt2_value in (("pos_emb", "rope", "learned"), ("qk_norm", True, False)):
            if override_args.get(key) == default:
                del override_args[key]
                swapped.append(f"--{key}={str(gpt2_value).lower()}")
        if swapped:
            print(f"note: {model_type}'s weights have learned positions and no QK-norm: using {' '.join(swapped)}")
        for key, value in override_args.items():
            if key == "attn" and value != "softmax":
                raise ModelLoadError("GPT-2 weights were trained with softmax attention: use --attn=softmax with "
                                     "--init_from=gpt2, or train sigmoid attention from scratch")
            if key in ("dropout", "sigmoid_bias", "sigmoid_backend", "layerscale_init") or (key == "block_size" and value <= 1024):
                args[key] = value
            elif key == "n_kv_head" and value in (0, n_head):
                pass
            elif getattr(gpt2, key) != value:
                raise ModelLoadError(f"--{key}={value} doesn't fit the {model_type} weights, which have {key}={getattr(gpt2, key)}: "
                                     f"drop --{key}, or use --init_from=scratch")
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise ModelLoadError(f"init_from={model_type} needs Hugging Face transformers: pip install transformers") from None
        try:
            hf_model = GPT2LMHeadModel.from_pretrained(model_type)
        except Exception as e:  # offline: OSError / connection errors, with long messages
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"could not get the {model_type} weights from Hugging Face ({first_line}): "
                                 f"this needs network access, or the weights in the local HF cache") from None
        block_size = args.pop("block_size")
        model = cls.from_hf_state_dict(hf_model.state_dict(), GPTConfig(**args, block_size=1024))
        if block_size < 1024:
            model.crop_block_size(block_size)
        return model

    @classmethod
    def from_hf_state_dict(cls, sd_hf, config):
        """A GPT-2 model from a Hugging Face GPT2LMHeadModel state dict (same names as ours)."""
        model = cls(config)
        sd = model.state_dict()
        # HF uses Conv1D modules, whose weights are the transpose of nn.Linear's
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        keys = [k for k in sd_hf if not k.endswith((".attn.masked_bias", ".attn.bias")) and k != "lm_head.weight"]
        assert set(keys) == set(sd) - {"lm_head.weight"}, "HF GPT-2 and our parameter names differ"
        with torch.no_grad():
            for k in keys:
                w = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
                sd[k][: w.size(0)].copy_(w)  # wte: the real vocab's rows; the padding rows are never used
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on the matmul and embedding weights (>= 2-D), none on biases, norms,
        LayerScale gammas and learnable sigmoid biases."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay_params = [p for p in params if p.dim() >= 2]
        nodecay_params = [p for p in params if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        use_fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra_args = dict(fused=True) if use_fused else dict()
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)

    def estimate_mfu(self, fwdbwd_per_iter, dt):
        """Model flops utilization: achieved flops / the GPU's dense bf16 peak; None on CPU or an
        unknown GPU. Counts 6N + 12*L*H*Q*T flops per token as nanoGPT (PaLM App. B), which counts
        the whole T x T attention although causal attention needs only half of it."""
        device = self.lm_head.weight.device
        if device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(device)
        peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # datasheet dense bf16 flops
        peak = next((flops for gpu, flops in peaks.items() if gpu in name), None)
        if peak is None:
            return None
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
        """Extend idx (B, T) by max_new_tokens sampled tokens; temperature 0 = greedy. Runs in eval
        mode. Keys and values are cached, so a new token costs one token's forward pass; once the
        sequence fills block_size every position shifts, so the last block_size tokens are recomputed
        (the same window nanoGPT crops to)."""
        was_training = self.training
        self.eval()
        block_size = self.config.block_size
        caches = None
        for _ in range(max_new_tokens):
            if caches is None or caches[0].length == block_size:  # (re)fill the cache from the window
                caches = caches or [KVCache(block_size) for _ in self.transformer.h]
                for cache in caches:
                    cache.length = 0
                logits, _ = self(idx[:, -block_size:], kv_caches=caches)
            else:  # only the newest token goes through the model
                logits, _ = self(idx[:, -1:], kv_caches=caches)
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p)
            idx = torch.cat((idx, idx_next), dim=1)
        self.train(was_training)
        return idx


def linear_cross_entropy(x, weight, targets, vocab_size, rows):
    """F.cross_entropy(x @ weight.T[:, :vocab_size], targets, ignore_index=-1) for x (N, C), weight
    (V_padded, C), targets (N,), computed rows at a time so that the (N, V) logits never exist at once
    (GPT-2 124M at batch 12: 2.5 GB of float32 logits, written and read twice per step)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets, vocab_size, rows)
    return chunked_cross_entropy(x, weight, targets, vocab_size, rows, grads=False)[0] / (targets != -1).sum()


def chunked_cross_entropy(x, weight, targets, vocab_size, rows, grads):
    """The sum of the losses and its gradients for x and weight (None unless grads). The logits come
    in the matmul's dtype (bfloat16 under autocast, as from F.linear), the softmax in float32."""
    loss = torch.zeros((), device=x.device)
    grad_x = torch.empty_like(x) if grads else None
    grad_w = torch.zeros_like(weight) if grads else None
    for i in range(0, len(x), rows):
        xc, yc = x[i:i + rows], targets[i:i + rows]  # (r, C), (r,)
        z = xc @ weight.T  # (r, V_padded)
        logits = z.float()
        logits[:, vocab_size:] = -math.inf  # the padding ids are no tokens
        lse = logits.logsumexp(dim=-1, keepdim=True)  # (r, 1)
        keep = (yc != -1)[:, None]  # (r, 1)
        y = yc.clamp(min=0)[:, None]
        loss += ((lse - logits.gather(1, y)) * keep).sum()
        if grads:  # d (sum of losses) / d logits = softmax - one_hot(y), zero on ignored rows
            dlogits = logits.sub_(lse).exp_().scatter_add_(1, y, -torch.ones_like(lse)).mul_(keep).to(z.dtype)
            grad_x[i:i + rows] = dlogits @ weight
            grad_w += dlogits.T @ xc
    return loss, grad_x, grad_w


class LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy with the gradients computed in the forward pass, while each chunk's logits
    are at hand (softmax - one_hot is all backward needs): nothing is recomputed and backward only
    scales them. The fused linear cross-entropy of Liger-Kernel (Hsu et al. 2024), in plain torch."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, rows):
        loss, grad_x, grad_w = chunked_cross_entropy(x, weight, targets, vocab_size, rows, grads=True)
        n = (targets != -1).sum()  # a tensor, not a Python int: no host sync
        ctx.save_for_backward(grad_x, grad_w, n)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, n = ctx.saved_tensors
        scale = grad_loss / n  # the gradients were of the sum
        return grad_x * scale, grad_w * scale, None, None, None


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """One token id per row from logits (B, V): greedy when temperature is 0; top_k keeps the k
    likeliest tokens, top_p the smallest set whose probability reaches p (Holtzman et al. 2019)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("Inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the tokens ranked above already reach top_p
        drop[:, 0] = False  # always keep the likeliest token
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -float("Inf")))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1)


def resolve_device(name):
    """--device (auto, cpu, cuda, cuda:N or mps) -> (device, device type), checked against the hardware
    for train.py and sample.py; raises ConfigError."""
    device = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device expects auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name} but torch {torch.__version__} sees no CUDA GPU: use --device=cpu or auto")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device=mps but MPS is not available here: use --device=cpu or auto")
    return device, kind


def load_checkpoint_file(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain data only, so a checkpoint cannot run code."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
    if not head:
        raise ModelLoadError(f"{path} is empty: point at a checkpoint written by train.py")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip file, or its older pickle
        raise ModelLoadError(f"{path} is not a torch checkpoint: point at a checkpoint written by train.py")
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):  # torch.load would say "Invalid argument"
        raise ModelLoadError(f"cannot read {path}: it is cut short or corrupt (no zip directory at its end): "
                             "is it a complete checkpoint written by train.py?")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ModelLoadError(f"refused {path}: it holds Python objects besides tensors and plain data, and "
                             "loading those could run code; use a checkpoint written by train.py") from None
    except Exception as e:  # truncated or corrupt: torch's first sentence says what it found
        reason = " ".join(str(e).split()).split(". ")[0].rstrip(".") or type(e).__name__
        raise ModelLoadError(f"cannot read {path} ({reason}): is it a complete checkpoint written by "
                             "train.py?") from None


def resolve_dtype(name, kind):
    """--dtype (auto, float32, bfloat16 or float16) on a device type -> the dtype's name, for
    train.py and sample.py: auto is bfloat16 where supported, else float16 on CUDA, float32 elsewhere;
    raises ConfigError."""
    bf16 = kind == "cuda" and torch.cuda.is_bf16_supported()
    if name == "auto":
        return ("bfloat16" if bf16 else "float16") if kind == "cuda" else "float32"
    if name == "bfloat16" and kind == "cuda" and not bf16:
        raise ConfigError(f"--dtype=bfloat16 but {torch.cuda.get_device_name()} lacks bfloat16: "
                          "use --dtype=float16 or auto")
    return name
