"""Attention: causality of every variant, agreement with a float64 formula, and config refusals."""
import dataclasses
import itertools
import math

import pytest
import torch

import flash_sigmoid
from attention import (CausalSelfAttention, alibi_slopes, apply_rope, check_attention_config, resolve_recipe,
                       rope_cos_sin)
from configurable import ConfigError, TrainConfig
from model import GPT, GPTConfig


def tiny_config(**kw):
    args = dict(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
    return GPTConfig(**{**args, **kw})


VARIANTS = [dict(attn=a, pos_emb=p, qk_norm=q, n_kv_head=kv)
            for a, p, q, kv in itertools.product(("softmax", "sigmoid"), ("learned", "rope", "alibi"), (False, True), (0, 2))]
VARIANTS += [dict(attn=a, hybrid_norm=True, layerscale=True, layerscale_init=0.5) for a in ("softmax", "sigmoid")]
VARIANTS += [dict(attn="sigmoid", sigmoid_bias=b, pos_emb=p) for b in ("learnable", "-2.5") for p in ("learned", "alibi")]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_output_at_t_ignores_later_tokens(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(**variant)).eval()
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    t = 9
    changed[:, t + 1:] = (idx[:, t + 1:] + 1) % 50
    logits, _ = model(idx, all_logits=True)
    logits_changed, _ = model(changed, all_logits=True)
    torch.testing.assert_close(logits[:, :t + 1], logits_changed[:, :t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, t + 1:], logits_changed[:, t + 1:])  # the change did reach the model


def float64_attention(layer, x, attn, pos_emb, sigmoid_bias, qk_norm):
    """The attention layer written out from its formulas in float64, independent of attention.py."""
    B, T, C = x.shape
    H, H_kv, hd = layer.n_head, layer.n_kv_head, C // layer.n_head
    p = {k: v.double() for k, v in layer.state_dict().items()}
    qkv = x.double() @ p["c_attn.weight"].T + p["c_attn.bias"]
    q = qkv[..., :C].view(B, T, H, hd).transpose(1, 2)
    k = qkv[..., C:C + H_kv * hd].view(B, T, H_kv, hd).transpose(1, 2)
    v = qkv[..., C + H_kv * hd:].view(B, T, H_kv, hd).transpose(1, 2)
    group = H // H_kv  # query head h reads key/value head h // group
    k, v = k[:, [h // group for h in range(H)]], v[:, [h // group for h in range(H)]]
    if qk_norm:
        q = torch.nn.functional.layer_norm(q, (hd,), p["q_norm.weight"], p["q_norm.bias"])
        k = torch.nn.functional.layer_norm(k, (hd,), p["k_norm.weight"], p["k_norm.bias"])
    if pos_emb == "rope":  # pair (c, c + hd/2) as a complex number, turned by angle pos * 10000^(-2c/hd)
        theta = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        turn = torch.polar(torch.ones_like(theta), theta)  # (T, hd/2)
        rotate = lambda z: torch.view_as_real(torch.complex(z[..., :hd // 2], z[..., hd // 2:]) * turn).transpose(-1, -2).reshape(z.shape)
        q, k = rotate(q), rotate(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, T, T)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    if pos_emb == "alibi":  # 4 heads: slopes 2^-2, 2^-4, 2^-6, 2^-8
        slopes = torch.tensor([2.0 ** (-2 * (h + 1)) for h in range(H)], dtype=torch.float64)
        scores = scores - slopes.view(H, 1, 1) * (i - j)
    if attn == "softmax":
        weights = torch.softmax(scores.masked_fill(j > i, float("-inf")), dim=-1)
    else:
        b = torch.as_tensor(sigmoid_bias, dtype=torch.float64).view(-1, 1, 1)  # per head or shared
        weights = torch.sigmoid(scores + b) * (j <= i)
    y = (weights @ v).transpose(1, 2).reshape(B, T, C)
    return y @ p["c_proj.weight"].T + p["c_proj.bias"]


FORMULA_CASES = [
    dict(attn="sigmoid", pos_emb="learned", sigmoid_bias="auto"),
    dict(attn="sigmoid", pos_emb="alibi", sigmoid_bias="auto"),
    dict(attn="sigmoid", pos_emb="alibi", sigmoid_bias="-1.5", n_kv_head=2),
    dict(attn="sigmoid", pos_emb="rope", sigmoid_bias="learnable", qk_norm=True),
    dict(attn="sigmoid", pos_emb="rope", sigmoid_bias="auto", n_kv_head=1),
    dict(attn="softmax", pos_emb="alibi", n_kv_head=2),
    dict(attn="softmax", pos_emb="rope", qk_norm=True),
]


@pytest.mark.parametrize("case", FORMULA_CASES, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_attention_matches_float64_formula(case):
    torch.manual_seed(0)
    config = tiny_config(block_size=32, **case)  # T = 12 < block_size: 'auto' must use -log(block_size), not -log(T)
    layer = CausalSelfAttention(config).eval()
    with torch.no_grad():
        for p in layer.parameters():  # nonzero biases and norm weights, so a missed term shows
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 12, 32)
    if case.get("sigmoid_bias") == "learnable":
        bias = layer.sigmoid_bias.detach()
    else:
        bias = -math.log(32) if case.get("sigmoid_bias") == "auto" else float(case.get("sigmoid_bias", 0))
    expected = float64_attention(layer, x, case["attn"], case["pos_emb"], bias, config.qk_norm)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-5)


KERNEL_CASES = [
    dict(sigmoid_bias="auto"),
    dict(sigmoid_bias="learnable", pos_emb="alibi", n_kv_head=2),
    dict(sigmoid_bias="-1.5", pos_emb="rope", qk_norm=True, n_kv_head=1),
]


@pytest.mark.skipif(not (flash_sigmoid.INTERPRET or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_triton_backend_matches_torch_backend(case):
    device = "cpu" if flash_sigmoid.INTERPRET else "cuda"
    outputs = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        layer = CausalSelfAttention(tiny_config(attn="sigmoid", n_embd=64, sigmoid_backend=backend, **case)).to(device)
        x = torch.randn(2, 13, 64, device=device, requires_grad=True)
        y = layer(x)
        y.square().sum().backward()
        bias_grad = layer.sigmoid_bias.grad if case["sigmoid_bias"] == "learnable" else torch.zeros(())
        outputs.append((y, x.grad, bias_grad))
    for torch_result, triton_result in zip(*outputs):
        torch.testing.assert_close(triton_result, torch_result, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not (flash_sigmoid.INTERPRET or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or a GPU")
def test_qk_norm_under_autocast_reaches_the_kernel_in_one_dtype():
    """CUDA autocast runs LayerNorm in float32 and the projections in half precision, so QK-norm
    handed the kernel float32 q, k beside a half v (a crash on the first GPU run). CPU autocast keeps
    LayerNorm in half, so here the norms are made to return float32 as they do on CUDA."""
    device = "cpu" if flash_sigmoid.INTERPRET else "cuda"
    half = torch.float16 if device == "cpu" else torch.bfloat16  # the interpreter has no bfloat16
    outputs = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        layer = CausalSelfAttention(tiny_config(attn="sigmoid", n_embd=64, qk_norm=True, sigmoid_backend=backend)).to(device)
        layer.q_norm = torch.nn.Sequential(layer.q_norm, Float32())
        layer.k_norm = torch.nn.Sequential(layer.k_norm, Float32())
        x = torch.randn(2, 13, 64, device=device, requires_grad=True)
        with torch.autocast(device, dtype=half):
            y = layer(x)
        y.float().square().sum().backward()
        outputs.append((y.float(), x.grad))
    for torch_result, triton_result in zip(*outputs):
        torch.testing.assert_close(triton_result, torch_result, rtol=2e-2, atol=2e-2)


class Float32(torch.nn.Module):
    def forward(self, x):
        return x.float()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sigmoid_attention_dropout_is_unbiased_and_off_in_eval(backend):
    """dropout acts on the attention weights, as softmax's does in SDPA: each draw differs from the
    eval output, and their mean is the eval output (kept weights are scaled by 1 / (1 - p))."""
    if backend == "triton" and not (flash_sigmoid.INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    device = "cuda" if torch.cuda.is_available() and not flash_sigmoid.INTERPRET else "cpu"
    torch.manual_seed(0)
    layer = CausalSelfAttention(tiny_config(attn="sigmoid", n_embd=64, dropout=0.5, sigmoid_backend=backend)).to(device)
    layer.resid_dropout = torch.nn.Identity()  # leave only the attention-weight dropout
    x = torch.randn(1, 8, 64, device=device)
    with torch.no_grad():
        expected = layer.eval()(x)
        torch.testing.assert_close(layer(x), expected)  # eval: no dropout
        draws = torch.stack([layer.train()(x) for _ in range(400)])
    assert not torch.allclose(draws[0], expected, atol=1e-3)
    assert (draws.mean(0) - expected).abs().max() < 0.1 * expected.abs().max()


def test_learnable_sigmoid_bias_gets_a_gradient():
    layer = CausalSelfAttention(tiny_config(attn="sigmoid", sigmoid_bias="learnable"))
    assert layer.sigmoid_bias.shape == (4,)
    torch.testing.assert_close(layer.sigmoid_bias.detach(), torch.full((4,), -math.log(16)))
    layer(torch.randn(2, 8, 32)).square().sum().backward()
    assert layer.sigmoid_bias.grad is not None and (layer.sigmoid_bias.grad != 0).all()


def test_softmax_has_no_sigmoid_bias_parameter():
    layer = CausalSelfAttention(tiny_config(attn="softmax", sigmoid_bias="learnable"))
    assert not any("sigmoid_bias" in name for name, _ in layer.named_parameters())


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_cos_sin(32, 8)
    q, k = torch.randn(8), torch.randn(8)
    rot = lambda x, pos: apply_rope(x.view(1, 1, 1, 8), cos[pos:pos + 1], sin[pos:pos + 1]).flatten()
    score = lambda i, j: rot(q, i) @ rot(k, j)
    torch.testing.assert_close(score(5, 2), score(20, 17))
    torch.testing.assert_close(rot(q, 7).norm(), q.norm())  # a rotation keeps the length


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(h + 1) for h in range(8)]))
    # 6 heads: the 4-head slopes, then every other 8-head slope
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]))


def test_record_norm_keeps_the_attention_output_norm():
    layer = CausalSelfAttention(tiny_config(attn="sigmoid"))
    layer(torch.randn(2, 8, 32))
    assert layer.last_out_norm is None
    layer.record_norm = True
    layer(torch.randn(2, 8, 32))
    assert layer.last_out_norm.shape == () and layer.last_out_norm > 0 and not layer.last_out_norm.requires_grad


REFUSED = [
    (dict(n_embd=100, n_head=6), "--n_embd"),
    (dict(n_head=6, n_kv_head=4), "--n_kv_head"),
    (dict(n_head=6, n_kv_head=-1), "--n_kv_head"),
    (dict(n_embd=36, n_head=4, pos_emb="rope"), "--pos_emb=learned"),
    (dict(sigmoid_bias="abc"), "-5.5"),
    (dict(attn="sigmoid", sigmoid_bias="nan"), "-5.5"),
    (dict(attn="sigmoid", sigmoid_bias="-log(n)-4"), "-log_n-4"),
    (dict(attn="sigmoid", sigmoid_bias="-log_n+4"), "-log_n-4"),
    (dict(attn="sigmoid", sigmoid_backend="triton", device="cpu"), "--sigmoid_backend=auto"),
    (dict(attn="sigmoid", sigmoid_backend="triton", n_embd=384, n_head=4), "--sigmoid_backend=auto"),  # head dim 96
]


@pytest.mark.parametrize("changes,fix", REFUSED, ids=[str(c) for c, _ in REFUSED])
def test_check_attention_config_refuses_in_one_line(changes, fix, monkeypatch):
    monkeypatch.setattr(flash_sigmoid, "INTERPRET", False)  # as on a machine without the interpreter
    with pytest.raises(ConfigError) as e:
        check_attention_config(dataclasses.replace(TrainConfig(), **changes))
    assert "\n" not in str(e.value) and fix in str(e.value)


@pytest.mark.parametrize("changes", [
    dict(), dict(attn="sigmoid"), dict(attn="sigmoid", sigmoid_bias="learnable", pos_emb="alibi", n_kv_head=2),
    dict(attn="sigmoid", sigmoid_bias="-5.5", pos_emb="rope"), dict(attn="sigmoid", sigmoid_bias="0"),
    dict(attn="sigmoid", sigmoid_bias="-log_n"), dict(attn="sigmoid", sigmoid_bias="-log_n-3.5", hybrid_norm=False),
    dict(attn="softmax", sigmoid_bias="learnable", sigmoid_backend="triton", device="cpu"),  # sigmoid keys unused
])
def test_check_attention_config_accepts(changes):
    check_attention_config(dataclasses.replace(TrainConfig(), **changes))


def test_default_sigmoid_is_the_recipe_and_softmax_keeps_what_helps_it():
    """--attn=sigmoid with no other flag: QK-norm, RoPE, hybrid norm, LayerScale 0.1 on both branches and
    b = -log(block_size) - 4; softmax gets the same QK-norm and positions and neither hybrid norm nor
    LayerScale (they made it worse), so the models differ in those alone."""
    cfg = TrainConfig(attn="sigmoid")
    sigmoid = GPT(GPTConfig.from_train_config(cfg, vocab_size=50))
    softmax = GPT(GPTConfig.from_train_config(dataclasses.replace(cfg, attn="softmax"), vocab_size=50))
    layer, block = sigmoid.transformer.h[0].attn, sigmoid.transformer.h[0]
    assert layer.sigmoid_bias == pytest.approx(-math.log(cfg.block_size) - 4)
    assert isinstance(layer.q_norm, torch.nn.LayerNorm) and layer.pos_emb == "rope" and "wpe" not in sigmoid.transformer
    assert isinstance(block.ln_attn, torch.nn.LayerNorm)
    assert torch.all(block.ls_1.gamma == 0.1) and torch.all(block.ls_2.gamma == 0.1)
    soft_block = softmax.transformer.h[0]
    assert isinstance(soft_block.ln_attn, torch.nn.Identity) and isinstance(soft_block.ls_1, torch.nn.Identity)
    assert isinstance(softmax.transformer.h[0].attn.q_norm, torch.nn.LayerNorm)
    differ = {k for k, v in dataclasses.asdict(sigmoid.config).items() if getattr(softmax.config, k) != v}
    assert differ == {"attn", "hybrid_norm", "layerscale", "sigmoid_bias"}  # sigmoid_bias is unused by softmax


@pytest.mark.parametrize("changes,bias,hybrid,layerscale", [
    (dict(), "-log_n-4", True, True),
    (dict(hybrid_norm=False), "-log_n", False, True),  # without hybrid norm auto is the paper's -log n
    (dict(layerscale=False), "-log_n-4", True, False),
    (dict(sigmoid_bias="-3"), "-3", True, True),
    (dict(attn="softmax"), "-log_n", False, False),
    (dict(attn="softmax", hybrid_norm=True), "-log_n-4", True, False),
])
def test_resolve_recipe_makes_auto_concrete(changes, bias, hybrid, layerscale):
    cfg = resolve_recipe(dataclasses.replace(TrainConfig(attn="sigmoid"), **changes))
    assert (cfg.sigmoid_bias, cfg.hybrid_norm, cfg.layerscale) == (bias, hybrid, layerscale)
    assert resolve_recipe(cfg) == cfg  # idempotent: checkpoints hold the concrete values


@pytest.mark.parametrize("value,want", [
    ("-log_n", lambda n: -math.log(n)), ("-log_n-4", lambda n: -math.log(n) - 4),
    ("-log_n-2.5", lambda n: -math.log(n) - 2.5), ("-7", lambda n: -7.0), ("auto", lambda n: -math.log(n)),
])
def test_sigmoid_bias_values_and_crop(value, want):
    """-log_n rules follow the block size when the model is cropped; a number stays; auto without
    hybrid norm (GPTConfig's default) is -log_n."""
    layer = CausalSelfAttention(tiny_config(attn="sigmoid", block_size=32, sigmoid_bias=value))
    assert layer.sigmoid_bias == pytest.approx(want(32))
    layer.crop_block_size(16)
    assert layer.sigmoid_bias == pytest.approx(want(16) if "log_n" in value or value == "auto" else want(32))


def test_learnable_bias_starts_at_the_default():
    for hybrid, offset in ((True, 4.0), (False, 0.0)):
        layer = CausalSelfAttention(tiny_config(attn="sigmoid", block_size=32, sigmoid_bias="learnable", hybrid_norm=hybrid))
        torch.testing.assert_close(layer.sigmoid_bias.data, torch.full((layer.n_head,), -math.log(32) - offset))


@pytest.mark.parametrize("changes,shown", [
    (dict(sigmoid_bias="learnable"), "--sigmoid_bias=learnable"),
    (dict(sigmoid_backend="torch"), "--sigmoid_backend=torch"),
])
def test_sigmoid_only_flags_on_softmax_warn_in_one_line(changes, shown, capsys):
    check_attention_config(dataclasses.replace(TrainConfig(), attn="softmax", **changes))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and shown in err and "--attn=softmax" in err
    check_attention_config(dataclasses.replace(TrainConfig(), attn="sigmoid", **changes))  # used there: no warning
    check_attention_config(dataclasses.replace(TrainConfig(), attn="softmax"))  # defaults: no warning
    assert capsys.readouterr().err == ""


def test_learnable_qk_scale_multiplies_every_score_of_its_head():
    """qk_scale = c is the same layer as one whose query norm gains (shared by the heads) are c times larger."""
    torch.manual_seed(0)
    for attn in ("softmax", "sigmoid"):
        scaled = CausalSelfAttention(tiny_config(attn=attn, qk_scale="learnable")).eval()
        plain = CausalSelfAttention(tiny_config(attn=attn)).eval()
        plain.load_state_dict({k: v for k, v in scaled.state_dict().items() if k != "qk_scale"})
        with torch.no_grad():
            scaled.qk_scale.fill_(2.5)
            plain.q_norm.weight.mul_(2.5)
            plain.q_norm.bias.mul_(2.5)
        x = torch.randn(2, 12, 32)
        torch.testing.assert_close(scaled(x), plain(x))
        scaled.train()
        scaled(x).sum().backward()
        assert scaled.qk_scale.grad.abs().min() > 0  # every head's factor learns
