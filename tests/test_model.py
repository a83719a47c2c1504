"""GPT: KV-cache generation, sampling, training, checkpoints and GPT-2 loading, on tiny CPU models."""
import dataclasses
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, ModelLoadError, sample_next


def tiny_config(**kw):
    args = dict(block_size=16, vocab_size=65, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=False)
    return GPTConfig(**{**args, **kw})


def generate_by_recomputing(model, idx, max_new_tokens):
    """Greedy decoding the plain way: the whole (cropped) sequence through the model at every step."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat((idx, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("pos_emb", ["learned", "rope", "alibi"])
@pytest.mark.parametrize("attn", ["softmax", "sigmoid"])
def test_kv_cache_generation_matches_full_recompute(attn, pos_emb):
    torch.manual_seed(0)
    model = GPT(tiny_config(attn=attn, pos_emb=pos_emb, qk_norm=pos_emb == "rope", n_kv_head=2)).eval()
    prompt = torch.randint(0, 65, (2, 5))
    # 5 + 30 tokens > block_size 16: also covers the window sliding past the cache
    assert torch.equal(model.generate(prompt, 30, temperature=0), generate_by_recomputing(model, prompt, 30))
    long_prompt = torch.randint(0, 65, (1, 20))  # longer than block_size from the start
    assert torch.equal(model.generate(long_prompt, 3, temperature=0), generate_by_recomputing(model, long_prompt, 3))


def test_generate_never_samples_padding_ids():
    model = GPT(tiny_config())
    assert model.padded_vocab_size == 128 and model.lm_head.weight.shape[0] == 128
    with torch.no_grad():  # make the 63 padding ids by far the likeliest, were they not cut off
        model.lm_head.weight[65:] = model.transformer.ln_f.weight.sign() * 10
    out = model.generate(torch.zeros(8, 1, dtype=torch.long), 20, temperature=1.0)
    assert out.max() < 65
    logits, _ = model(out[:, :16], all_logits=True)
    assert logits.shape == (8, 16, 65)


def test_generate_restores_training_mode():
    model = GPT(tiny_config()).train()
    model.generate(torch.zeros(1, 1, dtype=torch.long), 2)
    assert model.training


def test_sample_next_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(500, 1)
    assert set(sample_next(logits.clone(), top_p=0.6).flatten().tolist()) == {0, 1}  # 0.5 < 0.6 <= 0.8
    assert set(sample_next(logits.clone(), top_p=0.5).flatten().tolist()) == {0}
    assert set(sample_next(logits.clone(), top_p=0.0).flatten().tolist()) == {0}  # the top token always stays
    assert set(sample_next(logits.clone(), top_k=3).flatten().tolist()) == {0, 1, 2}
    assert sample_next(logits[:1], temperature=0).item() == 0


@pytest.mark.parametrize("extra", [dict(attn="softmax"), dict(attn="sigmoid"),
                                   dict(attn="sigmoid", sigmoid_bias="learnable", pos_emb="alibi", qk_norm=True,
                                        layerscale=True, hybrid_norm=True)])
def test_a_few_optimizer_steps_lower_the_loss(extra):
    torch.manual_seed(0)
    model = GPT(tiny_config(**extra))
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.99), device_type="cpu")
    data = torch.arange(17).repeat(4, 1) * 3 % 65  # an easy pattern: next = current + 3
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_weight_decay_only_on_matrices():
    model = GPT(tiny_config(attn="sigmoid", sigmoid_bias="learnable", layerscale=True))
    decay, no_decay = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu").param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_estimate_mfu_is_none_on_cpu():
    assert GPT(tiny_config()).estimate_mfu(fwdbwd_per_iter=4, dt=0.1) is None


def test_num_params_leaves_out_position_embeddings():
    model = GPT(tiny_config(pos_emb="learned"))
    assert model.get_num_params(non_embedding=False) - model.get_num_params() == 16 * 32
    rope = GPT(tiny_config(pos_emb="rope"))
    assert rope.get_num_params() == rope.get_num_params(non_embedding=False)


def checkpoint_of(model):
    return {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config)}


@pytest.mark.parametrize("extra", [dict(), dict(attn="sigmoid", sigmoid_bias="learnable", pos_emb="rope", qk_norm=True)])
def test_from_checkpoint_rebuilds_the_same_model(extra):
    torch.manual_seed(0)
    model = GPT(tiny_config(**extra)).eval()
    ckpt = checkpoint_of(model)
    ckpt["model"] = {"_orig_mod." + k: v for k, v in ckpt["model"].items()}  # as saved from a torch.compile'd model
    again = GPT.from_checkpoint(ckpt).eval()
    idx = torch.randint(0, 65, (2, 16))
    torch.testing.assert_close(again(idx, all_logits=True)[0], model(idx, all_logits=True)[0], rtol=0, atol=0)
    torch.testing.assert_close(again(idx, idx)[1], model(idx, idx)[1], rtol=0, atol=0)


def test_from_checkpoint_rejects_another_architecture_in_one_line():
    ckpt = checkpoint_of(GPT(tiny_config(n_embd=64)))
    ckpt["model_args"] = dataclasses.asdict(tiny_config())  # weights of a wider model
    with pytest.raises(ModelLoadError) as e:
        GPT.from_checkpoint(ckpt)
    assert "\n" not in str(e.value) and "another shape" in str(e.value)

    ckpt = checkpoint_of(GPT(tiny_config(qk_norm=True)))
    ckpt["model_args"]["qk_norm"] = False  # extra q_norm/k_norm weights
    with pytest.raises(ModelLoadError, match="unexpected") as e:
        GPT.from_checkpoint(ckpt)
    assert "\n" not in str(e.value)

    ckpt = checkpoint_of(GPT(tiny_config()))
    ckpt["model_args"]["n_expert"] = 8  # a model_args key this model.py doesn't know
    with pytest.raises(ModelLoadError, match="another model version") as e:
        GPT.from_checkpoint(ckpt)
    assert "\n" not in str(e.value)


def test_attention_output_norms_are_recorded_per_layer():
    model = GPT(tiny_config(attn="sigmoid"))
    model.record_attn_norms()
    model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))[1].backward()
    norms = model.attn_out_norms()
    assert len(norms) == 2 and all(isinstance(n, float) and n > 0 for n in norms)


def test_crop_block_size():
    for pos_emb in ("learned", "rope"):
        model = GPT(tiny_config(pos_emb=pos_emb))
        model.crop_block_size(8)
        logits, _ = model(torch.zeros(1, 8, dtype=torch.long))
        assert model.config.block_size == 8 and logits.shape == (1, 1, 65)


def test_from_pretrained_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ModelLoadError, match="pip install transformers") as e:
        GPT.from_pretrained("gpt2", dict(dropout=0.0))
    assert "\n" not in str(e.value)


def test_from_pretrained_refuses_sigmoid_attention():
    with pytest.raises(ModelLoadError, match="softmax"):
        GPT.from_pretrained("gpt2", dict(attn="sigmoid"))
    with pytest.raises(ModelLoadError, match="--pos_emb=alibi doesn't fit"):
        GPT.from_pretrained("gpt2", dict(pos_emb="alibi"))


def hf_gpt2_state_dict(n_layer, n_head, n_embd, vocab_size, n_positions):
    """Random weights under Hugging Face GPT2LMHeadModel's names and layouts: its Conv1D weights are
    (in, out), the transpose of nn.Linear's; older versions also save the attention mask buffers."""
    C = n_embd
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: 0.2 * torch.randn(*shape, generator=g)  # biases and norm weights nonzero too
    sd = {"transformer.wte.weight": rand(vocab_size, C), "transformer.wpe.weight": rand(n_positions, C)}
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        sd.update({h + "ln_1.weight": 1 + rand(C), h + "ln_1.bias": rand(C),
                   h + "attn.bias": torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions),
                   h + "attn.masked_bias": torch.tensor(-1e4),
                   h + "attn.c_attn.weight": rand(C, 3 * C), h + "attn.c_attn.bias": rand(3 * C),
                   h + "attn.c_proj.weight": rand(C, C), h + "attn.c_proj.bias": rand(C),
                   h + "ln_2.weight": 1 + rand(C), h + "ln_2.bias": rand(C),
                   h + "mlp.c_fc.weight": rand(C, 4 * C), h + "mlp.c_fc.bias": rand(4 * C),
                   h + "mlp.c_proj.weight": rand(4 * C, C), h + "mlp.c_proj.bias": rand(C)})
    sd.update({"transformer.ln_f.weight": 1 + rand(C), "transformer.ln_f.bias": rand(C),
               "lm_head.weight": sd["transformer.wte.weight"]})  # tied, and saved under both names
    return sd


def gpt2_logits(sd, idx, n_layer, n_head):
    """GPT-2's forward written out from its definition on the HF-layout weights, independent of model.py."""
    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]  # (B, T, C)
    C = x.shape[-1]
    hd = C // n_head
    norm = lambda x, name: F.layer_norm(x, (C,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)
    conv1d = lambda x, name: x @ sd[name + ".weight"] + sd[name + ".bias"]  # (in, out) weights: x @ W
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        q, k, v = conv1d(norm(x, h + "ln_1"), h + "attn.c_attn").split(C, dim=-1)
        q, k, v = (t.view(B, T, n_head, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))  # (B, nh, T, T)
        y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + conv1d(y, h + "attn.c_proj")
        m = conv1d(norm(x, h + "ln_2"), h + "mlp.c_fc")
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m ** 3)))  # GPT-2's gelu
        x = x + conv1d(m, h + "mlp.c_proj")
    return norm(x, "transformer.ln_f") @ sd["lm_head.weight"].t()  # (B, T, vocab_size)


def test_hf_gpt2_weights_give_the_same_logits():
    # vocab 100 is padded to 128 inside GPT: the conversion must fill the real rows and leave the rest
    sd = hf_gpt2_state_dict(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=16)
    model = GPT.from_hf_state_dict(sd, GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=4, n_embd=32,
                                                 bias=True, pos_emb="learned", qk_norm=False)).eval()
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, all_logits=True)[0], gpt2_logits(sd, idx, n_layer=2, n_head=4), rtol=1e-4, atol=1e-4)


def plain_cross_entropy(x, weight, targets, vocab_size):
    return torch.nn.functional.cross_entropy((x @ weight.T)[:, :vocab_size], targets, ignore_index=-1)


@pytest.mark.parametrize("rows", [7, 1000])  # several chunks, the last one shorter; one chunk
def test_chunked_loss_matches_plain_cross_entropy_and_its_gradients(rows):
    from model import linear_cross_entropy
    torch.manual_seed(0)
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)  # 50 real ids + 14 padding rows
    targets = torch.randint(0, 50, (40,))
    targets[[3, 17]] = -1  # ignored positions
    want = plain_cross_entropy(x, weight, targets, 50)
    want_grads = torch.autograd.grad(want * 3, (x, weight))
    x32, w32 = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    got = linear_cross_entropy(x32, w32, targets, 50, rows)
    got_grads = torch.autograd.grad(got * 3, (x32, w32))  # * 3: backward scales by the incoming gradient
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
    assert torch.all(got_grads[1][50:] == 0)  # no gradient reaches the padding rows
    with torch.no_grad():  # the evaluation path: the same loss, no gradients computed
        torch.testing.assert_close(linear_cross_entropy(x32, w32, targets, 50, rows), got, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_loss_and_gradients_match_the_plain_path(dtype):
    torch.manual_seed(0)
    model = GPT(tiny_config(attn="sigmoid", dropout=0.0))
    idx, targets = torch.randint(0, 65, (2, 2, 16))
    losses, grads = [], []
    for chunked in (True, False):
        model.chunked_loss = chunked
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(idx, targets)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(losses[0], losses[1], **tol)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **tol)


def test_chunked_loss_compiles_into_one_graph():
    model = GPT(tiny_config())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    idx = torch.randint(0, 65, (2, 16))
    _, loss = compiled(idx, idx)
    loss.backward()
    model.chunked_loss = False
    torch.testing.assert_close(loss, model(idx, idx)[1])


def test_from_pretrained_takes_gpt2s_positions_and_qk_norm_with_a_note(monkeypatch, capsys):
    """The defaults (rope, qk_norm) reach from_pretrained from train.py: GPT-2's weights load anyway,
    with learned positions and no QK-norm, and one printed note says so."""
    import types
    config = GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, bias=True,
                       pos_emb="learned", qk_norm=False)
    with torch.device("meta"):  # the shapes of GPT-2 124M without allocating it
        shapes = {k: v.shape for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    hf_state = {k: torch.zeros(s[::-1] if k.endswith(transposed) else s) for k, s in shapes.items()}
    hf_state["transformer.wpe.weight"] = torch.arange(1024.0).view(-1, 1).expand(1024, 768)  # row p holds p
    fake_hf = types.SimpleNamespace(state_dict=lambda: hf_state)
    fake = types.SimpleNamespace(GPT2LMHeadModel=types.SimpleNamespace(from_pretrained=lambda name: fake_hf))
    monkeypatch.setitem(sys.modules, "transformers", fake)
    model = GPT.from_pretrained("gpt2", dict(dropout=0.0, block_size=64, pos_emb="rope", qk_norm=True))
    note = capsys.readouterr().out.strip()
    assert note == "note: gpt2's weights have learned positions and no QK-norm: using --pos_emb=learned --qk_norm=false"
    assert model.config.pos_emb == "learned" and not model.config.qk_norm and model.config.block_size == 64
    assert model.transformer.wpe.weight[:, 0].tolist() == list(range(64))  # GPT-2's positions, cropped
    assert not any("q_norm" in k for k in model.state_dict())


def test_checkpoint_without_a_later_key_loads_as_the_old_model():
    model = GPT(tiny_config()).eval()
    ckpt = checkpoint_of(model)
    del ckpt["model_args"]["qk_scale"]  # written before qk_scale existed
    again = GPT.from_checkpoint(ckpt).eval()
    assert again.config.qk_scale == "fixed"
    idx = torch.randint(0, 65, (2, 16))
    torch.testing.assert_close(again(idx, all_logits=True)[0], model(idx, all_logits=True)[0], rtol=0, atol=0)


def test_checkpoint_with_the_old_auto_bias_keeps_its_bias():
    """sigmoid_bias 'auto' in a checkpoint was written when auto meant -log(block_size), with or without
    hybrid norm; today's auto with hybrid norm is -log(block_size) - 4: the checkpoint keeps its bias."""
    model = GPT(tiny_config(attn="sigmoid", sigmoid_bias="-log_n", hybrid_norm=True, layerscale=True)).eval()
    ckpt = checkpoint_of(model)
    ckpt["model_args"]["sigmoid_bias"] = "auto"
    again = GPT.from_checkpoint(ckpt).eval()
    assert again.config.sigmoid_bias == "-log_n"
    assert again.transformer.h[0].attn.sigmoid_bias == pytest.approx(-math.log(16))
    idx = torch.randint(0, 65, (2, 16))
    torch.testing.assert_close(again(idx, all_logits=True)[0], model(idx, all_logits=True)[0], rtol=0, atol=0)
