"""flash_sigmoid against an independent float64 formula, on the CPU through the Triton interpreter.

Small shapes, fp32 and fp16, odd T, causal and not, GQA, ALiBi, fixed and learnable biases. The same
file runs on a GPU with TRITON_INTERPRET=0; there the fp32 cases get a looser bound (`fp32_bound`).
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import flash_sigmoid as fs
from tests.attention_float64 import dropout_hashes, dropout_keep_mask, rel_err, sigmoid_attention_f64

pytestmark = pytest.mark.skipif(not fs.INTERPRET and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a GPU")
DEVICE = "cuda" if torch.cuda.is_available() and not fs.INTERPRET else "cpu"


def fp32_bound(interpreter_bound):
    """The relative error fp32 inputs may have: the interpreter computes fp32 in IEEE fp32 (no TF32),
    so its bound is tight; a GPU runs fp32 tl.dot in TF32 (a 10-bit mantissa, as fp16's) and the forward's
    hardware tanh (relative error ~2^-11), so there fp32 gets twice the fp16 bound: an H200 measured
    2.02e-3 at T=1, where a single score's error is not averaged over keys."""
    return interpreter_bound if DEVICE == "cpu" else 4e-3


def make_inputs(B, H, H_kv, T, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(dtype) for h in (H, H_kv, H_kv))
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


@pytest.fixture(autouse=True, scope="module")
def poisoned_outputs():
    """Every output and gradient the launchers allocate starts as NaN, so an element a kernel
    forgets to write fails the test (torch.empty alone may hand out zeros, which would pass)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("_output_like", "_grad_like"):
            allocate = getattr(fs, name)
            patch.setattr(fs, name, lambda x, allocate=allocate: allocate(x).fill_(float("nan")))
        yield


@pytest.fixture(params=["fused dq", "deterministic"])
def backward_path(request, monkeypatch):
    """Both backwards, at every head dim: dQ added atomically by the dK/dV kernel, and (under torch's
    deterministic mode) dQ from its own kernel."""
    monkeypatch.setattr(fs, "FUSE_DQ_MIN_HEAD_DIM", 0)
    monkeypatch.setattr(fs, "FUSE_DQ_MIN_T", 0)
    deterministic = request.param == "deterministic"
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    yield request.param
    torch.use_deterministic_algorithms(before)


def test_deterministic_mode_chooses_the_dq_kernel(monkeypatch):
    monkeypatch.setattr(fs, "FUSE_DQ_MIN_HEAD_DIM", 0)
    monkeypatch.setattr(fs, "FUSE_DQ_MIN_T", 0)
    launches = []
    kernel = fs._bwd_dq_kernel
    monkeypatch.setattr(fs, "_bwd_dq_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or kernel[grid]})())
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 2, 2, 20, 16, torch.float32, 3))
    fused = torch.autograd.grad(fs.flash_sigmoid(q, k, v).sum(), q)[0]
    assert not launches
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert rel_err(torch.autograd.grad(fs.flash_sigmoid(q, k, v).sum(), q)[0], fused) < 1e-6 and len(launches) == 1


def test_dq_is_fused_only_from_the_measured_head_dim_and_length(monkeypatch):
    monkeypatch.setattr(fs, "FUSE_DQ_MIN_T", 24)  # the rule's shape, at a length the interpreter runs quickly
    launches = []
    kernel = fs._bwd_dq_kernel
    monkeypatch.setattr(fs, "_bwd_dq_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: launches.append((grid, D, T)) or kernel[grid]})())
    for D, T in ((fs.FUSE_DQ_MIN_HEAD_DIM // 2, 24), (fs.FUSE_DQ_MIN_HEAD_DIM, 23), (fs.FUSE_DQ_MIN_HEAD_DIM, 24)):
        q, k, v = (t.requires_grad_() for t in make_inputs(1, 1, 1, T, D, torch.float32, 4))
        torch.autograd.grad(fs.flash_sigmoid(q, k, v).sum(), q)
    # its own dQ kernel for the smaller head dim and the shorter length; fused at both thresholds
    assert [(D, T) for _, D, T in launches] == [(fs.FUSE_DQ_MIN_HEAD_DIM // 2, 24), (fs.FUSE_DQ_MIN_HEAD_DIM, 23)]


CASES = [  # B, H, H_kv, T, D, causal, dtype, alibi, learnable bias
    (2, 4, 4, 37, 16, True, torch.float32, False, False),
    (1, 4, 2, 50, 32, False, torch.float32, True, True),
    (1, 2, 1, 33, 64, True, torch.float16, True, True),
    (1, 2, 2, 45, 128, False, torch.float32, False, False),
    (1, 4, 1, 64, 32, True, torch.float16, False, True),
    (2, 2, 2, 17, 64, False, torch.float16, False, False),
    (1, 2, 1, 1, 128, True, torch.float32, True, True),
    (1, 4, 2, 100, 64, True, torch.float16, True, True),
]


@pytest.mark.parametrize("B,H,H_kv,T,D,causal,dtype,alibi,learnable", CASES)
def test_forward_and_gradients_match_float64(B, H, H_kv, T, D, causal, dtype, alibi, learnable, backward_path):
    seed = hash((B, H, H_kv, T, D, causal)) % 10_000
    q, k, v = make_inputs(B, H, H_kv, T, D, dtype, seed)
    bias = torch.linspace(-math.log(T), 1.0, H, device=DEVICE)  # several bias values, one per head
    slopes = torch.rand(H, device=DEVICE) * 0.5 if alibi else None
    do = torch.randn(B, H, T, D, device=DEVICE).to(dtype)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    bias_arg = bias.clone().requires_grad_() if learnable else bias
    out = fs.flash_sigmoid(*leaves, causal=causal, sigmoid_bias=bias_arg, alibi_slopes=slopes)
    out.backward(do)

    ref_leaves = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    ref_bias = bias.double().cpu().requires_grad_()
    ref_out = sigmoid_attention_f64(*ref_leaves, causal, ref_bias, slopes)
    ref_out.backward(do.double().cpu())

    tol = fp32_bound(2e-6) if dtype == torch.float32 else 2e-3
    assert torch.isfinite(out).all()
    assert rel_err(out.cpu(), ref_out) < tol
    for got, want in zip(leaves, ref_leaves):
        assert torch.isfinite(got.grad).all()
        assert rel_err(got.grad.cpu(), want.grad) < tol
    if learnable:
        assert rel_err(bias_arg.grad.cpu(), ref_bias.grad) < tol


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_float64_formula(causal):
    q, k, v = make_inputs(2, 4, 2, 29, 16, torch.float32, 3)
    bias, slopes = torch.randn(4, device=DEVICE), torch.rand(4, device=DEVICE)  # where q is
    got = fs.sigmoid_attention_reference(q.double(), k.double(), v.double(), causal, bias.double(), None, slopes.double())
    assert rel_err(got.cpu(), sigmoid_attention_f64(q, k, v, causal, bias, slopes)) < 1e-12


def test_default_bias_is_minus_log_t():
    q, k, v = make_inputs(1, 2, 2, 40, 16, torch.float32, 5)
    got = fs.flash_sigmoid(q, k, v, causal=True)
    want = sigmoid_attention_f64(q, k, v, True, [-math.log(40)] * 2)
    assert rel_err(got.cpu(), want) < fp32_bound(2e-6)


def test_compiles_without_graph_break():  # bench_attention.py checks the inductor backend on the GPU
    q, k, v = make_inputs(1, 2, 2, 24, 16, torch.float32, 11)
    compiled = torch.compile(lambda q, k, v: fs.flash_sigmoid(q, k, v, causal=True) * 2, backend="aot_eager",
                             fullgraph=True)  # fullgraph: a graph break raises
    assert rel_err(compiled(q, k, v).cpu(), 2 * sigmoid_attention_f64(q, k, v, True, [-math.log(24)] * 2)) < fp32_bound(2e-6)


def test_strided_views_of_one_qkv_tensor():
    """The model slices q, k, v out of one (B, T, 3, H, D) projection: strided, not contiguous."""
    B, T, H, D = 2, 19, 2, 16
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE).requires_grad_()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views
    assert not q.is_contiguous()
    fs.flash_sigmoid(q, k, v, causal=True).square().sum().backward()
    got = qkv.grad.clone()
    qkv64 = qkv.detach().double().cpu().requires_grad_()
    sigmoid_attention_f64(*(qkv64[:, :, i].transpose(1, 2) for i in range(3)), True, [-math.log(T)] * H).square().sum().backward()
    assert rel_err(got.cpu(), qkv64.grad) < fp32_bound(2e-6)


def test_output_and_gradients_have_sdpa_memory_layout():
    """Like SDPA: the output is (B, H, T, D) stored as (B, T, H, D), so the model's transpose back to
    (B, T, C) is free, and each gradient has its input's layout, so concatenating dq, dk, dv is a plain copy."""
    qkv = torch.randn(2, 21, 3, 3, 16, device=DEVICE, requires_grad=True)  # the model's q, k, v: views of one projection
    views = [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    out = fs.flash_sigmoid(*views, causal=True)
    assert out.transpose(1, 2).is_contiguous()
    grads = torch.autograd.grad(out.sum(), views)
    assert all(g.transpose(1, 2).is_contiguous() for g in grads)


def test_gradients_stay_right_when_the_input_layout_has_the_head_dim_inside():
    """An unfold view (strides (H*20, 20, 1, 1)) would make empty_like put T innermost; the kernels
    assume a unit stride on the head dim, so such gradients are allocated contiguous instead."""
    bases = [torch.randn(2, 3, 20, device=DEVICE, requires_grad=True) for _ in range(3)]
    q, k, v = (b.unfold(2, 16, 1) for b in bases)  # (2, 3, 5, 16), overlapping rows
    assert torch.empty_like(q).stride(-1) != 1  # the case this guards
    for causal in (True, False):
        got = torch.autograd.grad(fs.flash_sigmoid(q, k, v, causal=causal).square().sum(), bases)
        bases64 = [b.detach().double().cpu().requires_grad_() for b in bases]
        ref = sigmoid_attention_f64(*(b.unfold(2, 16, 1) for b in bases64), causal, [-math.log(5)] * 3)
        want = torch.autograd.grad(ref.square().sum(), bases64)
        assert all(rel_err(g.cpu(), w) < fp32_bound(2e-6) for g, w in zip(got, want))


@pytest.mark.parametrize("layout", ["qkv views", "contiguous", "size-1 dims"])
def test_custom_ops_fake_kernels_match_the_real_ones(layout):
    """torch.compile plans memory from the fake (meta) kernels: their shapes and strides must be the real ones."""
    B, H, H_kv, T, D = (1, 1, 1, 1, 16) if layout == "size-1 dims" else (2, 4, 2, 19, 16)
    if layout == "qkv views":
        qkv = torch.randn(B, T, H + 2 * H_kv, D, device=DEVICE)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([H, H_kv, H_kv], dim=2))
    else:
        q, k, v = make_inputs(B, H, H_kv, T, D, torch.float32, 17)
    bias = torch.full((H,), -2.0, device=DEVICE)
    do = torch.randn(B, T, H, D, device=DEVICE).transpose(1, 2)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.flash_sigmoid.forward.default, (q, k, v, bias, None, None, 0.0, True, 0.25),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.flash_sigmoid.backward.default, (do, q, k, v, bias, None, None, 0.0, True, 0.25, True),
                          test_utils=checks)


def test_bias_gradient_is_right_on_the_first_call_while_autotuning(monkeypatch):
    """The autotuner runs every dK/dV candidate on one partial-sum buffer; a winner with bigger key
    blocks writes fewer rows, so rows a loser wrote must not survive into d bias."""
    import triton
    monkeypatch.setattr(fs._bwd_dkdv_kernel, "configs", [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}),
                                                         triton.Config({"BLOCK_M": 16, "BLOCK_N": 32})])
    monkeypatch.setattr(fs._bwd_dkdv_kernel, "cache", {})
    # a GPU's disk cache would skip the tuning (Triton >= 3.4 has one)
    monkeypatch.setattr(fs._bwd_dkdv_kernel, "cache_results", False, raising=False)
    times = iter([2.0, 1.0])  # the 32-wide candidate wins, after the 16-wide one wrote more rows
    # do_bench is a cached property that asks the (absent) GPU driver: set the cached value itself
    monkeypatch.setitem(vars(fs._bwd_dkdv_kernel), "do_bench", lambda fn, quantiles=None: (fn(), [next(times)] * 3)[1])
    q, k, v = make_inputs(1, 2, 2, 64, 16, torch.float32, 21)
    bias = torch.full((2,), -2.0, device=DEVICE, requires_grad=True)
    got = torch.autograd.grad(fs.flash_sigmoid(q, k, v, sigmoid_bias=bias).sum(), bias)[0]
    ref_bias = bias.detach().double().cpu().requires_grad_()
    want = torch.autograd.grad(sigmoid_attention_f64(q, k, v, True, ref_bias).sum(), ref_bias)[0]
    assert rel_err(got.cpu(), want) < fp32_bound(1e-5)


@pytest.mark.parametrize("B,H,H_kv,T,D,causal,dtype", [(2, 4, 2, 37, 16, True, torch.float32),
                                                      (1, 2, 2, 45, 32, False, torch.float16)])
def test_dropout_forward_and_gradients_match_float64_with_the_kernels_mask(B, H, H_kv, T, D, causal, dtype,
                                                                           backward_path):
    q, k, v = make_inputs(B, H, H_kv, T, D, dtype, 31)
    bias = torch.linspace(-3.0, 1.0, H, device=DEVICE)
    seed, p = torch.tensor([2**40 + 12345], device=DEVICE), 0.3
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    bias_arg = bias.clone().requires_grad_()
    out = fs.flash_sigmoid(*leaves, causal=causal, sigmoid_bias=bias_arg, dropout_p=p, dropout_seed=seed)
    do = torch.randn_like(out)
    out.backward(do)
    keep = dropout_keep_mask(seed, B, H, T, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03  # 1 - p of the weights kept
    ref_leaves = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    ref_bias = bias.double().cpu().requires_grad_()
    ref = fs.sigmoid_attention_reference(*ref_leaves, causal=causal, sigmoid_bias=ref_bias, dropout_p=p,
                                         dropout_keep=keep)
    ref.backward(do.double().cpu())
    tol = fp32_bound(2e-6) if dtype == torch.float32 else 2e-3
    assert rel_err(out.cpu(), ref) < tol
    for got, want in zip(leaves + [bias_arg], ref_leaves + [ref_bias]):
        assert rel_err(got.grad.cpu(), want.grad) < tol


def test_hash_table_holds_every_querys_and_keys_hash():
    B, H, T = 2, 3, 200  # two blocks of the table, the second one padded
    seed = torch.tensor([2**40 + 7], device=DEVICE)
    table = fs._dropout_hashes(seed, B * H, T).cpu().long() & 0xFFFFFFFF  # (B*H, 2, T_pad): the uint32s
    query_hash, key_hash = dropout_hashes(seed, B, H, T)
    assert table.shape == (B * H, 2, 256)
    assert torch.equal(table[:, 0, :T], query_hash.view(B * H, T))
    assert torch.equal(table[:, 1, :T], key_hash.view(B * H, T))


@pytest.mark.parametrize("T,causal", [(64, False), (200, False), (130, True)])
def test_kernel_draws_the_dropout_mask_its_torch_rewrite_draws(T, causal):
    """With V one-hot on 128 keys at a time the output's column c is the dropped weight of key j0 + c,
    so the kernel's mask reads off as its nonzero entries (a sigmoid is never 0), and must equal the
    torch rewrite's, exactly. T past 128 reads the hash table's second block."""
    B, H, D, p = 2, 2, 128, 0.25
    q, k, _ = make_inputs(B, H, H, T, D, torch.float32, 43)
    seed = torch.tensor([2**40 + 99], device=DEVICE)
    keep = dropout_keep_mask(seed, B, H, T, p)
    if causal:
        keep &= torch.ones(T, T, dtype=torch.bool).tril()
    for j0 in range(0, T, D):
        n = min(D, T - j0)
        v = torch.zeros(B, H, T, D, device=DEVICE)
        v[:, :, j0:j0 + n, :n] = torch.eye(n, device=DEVICE)
        out = fs.flash_sigmoid(q, k, v, causal=causal, dropout_p=p, dropout_seed=seed)
        assert torch.equal(out[..., :n].cpu() != 0, keep[..., j0:j0 + n])


def test_dropout_mask_drops_p_and_differs_by_seed_head_and_position():
    B, H, T = 2, 4, 256  # 2^19 weights
    for p in (0.1, 0.5, 0.9):
        keep = dropout_keep_mask(torch.tensor([1234]), B, H, T, p).float()
        assert abs(keep.mean().item() - (1 - p)) < 0.004  # 4 standard deviations at most
    keep = dropout_keep_mask(torch.tensor([5]), B, H, T, 0.5).float()
    heads = keep.view(B * H, -1)
    agree = heads @ heads.T + (1 - heads) @ (1 - heads).T  # weights on which two heads agree
    assert (agree / T**2 - torch.eye(B * H)).abs().max() < 0.51  # about half, off the diagonal
    for other_seed in (6, 5 + 2**32):  # the seed's high 32 bits count too
        assert (dropout_keep_mask(torch.tensor([other_seed]), B, H, T, 0.5).float() == keep).float().mean() < 0.51
    right, below = (keep[..., :, 1:] == keep[..., :, :-1]), (keep[..., 1:, :] == keep[..., :-1, :])
    assert abs(right.float().mean() - 0.5) < 0.005 and abs(below.float().mean() - 0.5) < 0.005  # neighbours independent


def test_dropout_mask_has_no_correlated_rows_or_columns():
    """The keep test multiplies a query's hash by a key's: every pair of rows, and of columns, must
    still look independent (xor-ing or adding the two hashes instead fails this: rows 0.9 correlated)."""
    T = 512
    for p in (0.1, 0.5):
        for keep in dropout_keep_mask(torch.tensor([77]), 1, 4, T, p).double()[0]:  # one (T, T) mask per head
            z = (keep - keep.mean()) / keep.std()
            for corr in (z @ z.T / T, z.T @ z / T):  # every pair of rows, of columns
                corr.fill_diagonal_(0)
                assert corr.abs().max() < 0.3  # 130k pairs of independent rows: ~0.22 at most
            dropped = 1 - keep  # all four weights of a 2 x 2 block dropped: p^4 of them
            quads = dropped[1:, 1:] * dropped[:-1, 1:] * dropped[1:, :-1] * dropped[:-1, :-1]
            assert abs(quads.mean().item() / p**4 - 1) < (0.1 if p == 0.5 else 0.5)


def test_dropout_mask_follows_the_seed():
    q, k, v = make_inputs(1, 2, 2, 20, 16, torch.float32, 41)
    run = lambda seed: fs.flash_sigmoid(q, k, v, dropout_p=0.5, dropout_seed=torch.tensor([seed], device=DEVICE))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    torch.manual_seed(0)
    first = fs.flash_sigmoid(q, k, v, dropout_p=0.5)  # seed drawn from torch's generator
    torch.manual_seed(0)
    assert torch.equal(first, fs.flash_sigmoid(q, k, v, dropout_p=0.5))
    assert torch.equal(fs.flash_sigmoid(q, k, v, dropout_p=0.0), fs.flash_sigmoid(q, k, v))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        fs.flash_sigmoid(q, k, v, dropout_p=1.0)
    for bad_seed in (7, torch.tensor([7.0], device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE)):
        with pytest.raises(ValueError, match=r"dropout_seed must be a \(1,\) int64 tensor"):
            fs.flash_sigmoid(q, k, v, dropout_p=0.5, dropout_seed=bad_seed)


HOPPER = (not fs.INTERPRET and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
          and fs.flash_sigmoid_hopper.gluon is not None)


@pytest.mark.skipif(not HOPPER, reason="the Gluon forward needs a Hopper GPU and a Triton with Gluon")
@pytest.mark.parametrize("B, H, H_kv, T, causal, dtype, bound", [
    (2, 4, 2, 4097, True, torch.bfloat16, 5e-3),   # GQA, one key past a whole tile
    (1, 2, 2, 4159, False, torch.float16, 1e-3),
])
def test_hopper_forward_matches_float64(monkeypatch, B, H, H_kv, T, causal, dtype, bound):
    """With FLASH_SIGMOID_HOPPER's switch on, a launch it supports takes the Gluon forward (counted), on
    q, k, v sliced from one projection as the model makes them; the gradients come from the portable
    backward and must match too."""
    monkeypatch.setattr(fs, "HOPPER_FORWARD", True)
    calls = []
    forward = fs.flash_sigmoid_hopper.forward
    monkeypatch.setattr(fs.flash_sigmoid_hopper, "forward", lambda *a: calls.append(1) or forward(*a))
    D = 128
    g = torch.Generator().manual_seed(T)
    qkv = torch.randn(B, T, H + 2 * H_kv, D, generator=g).to(dtype).to(DEVICE).requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in qkv.split([H, H_kv, H_kv], dim=2))
    bias = torch.linspace(-math.log(T), -1.0, H)
    do = torch.randn(B, H, T, D, generator=g).to(dtype).to(DEVICE)
    out = fs.flash_sigmoid(q, k, v, causal, bias.to(DEVICE))
    out.backward(do)
    assert calls == [1]
    qkv64 = qkv.detach().double().cpu().requires_grad_()
    ref = sigmoid_attention_f64(*(t.transpose(1, 2) for t in qkv64.split([H, H_kv, H_kv], dim=2)), causal, bias)
    ref.backward(do.double().cpu())
    assert rel_err(out.cpu(), ref) < bound and rel_err(qkv.grad.cpu(), qkv64.grad) < bound


def test_hopper_switch_defaults_to_the_measured_triton_and_obeys_the_environment():
    """Unset: on with Triton 3.6 (measured), off with 3.9 (its ptxas serializes the causal kernel); 1 and
    0 force it; anything else is one clear error at import."""
    root = Path(__file__).resolve().parent.parent
    env = {key: value for key, value in os.environ.items() if key != "FLASH_SIGMOID_HOPPER"}
    for version, setting, expected in (("3.6.0", None, True), ("3.9.0", None, False), ("3.9.0", "1", True),
                                       ("3.6.0", "0", False)):
        probe = f"import triton; triton.__version__ = {version!r}; import flash_sigmoid; print(flash_sigmoid.HOPPER_FORWARD)"
        run_env = env if setting is None else {**env, "FLASH_SIGMOID_HOPPER": setting}
        out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=run_env, capture_output=True, text=True,
                             check=True).stdout
        assert out.strip() == str(expected), (version, setting, out)
    out = subprocess.run([sys.executable, "-c", "import flash_sigmoid"], cwd=root,
                         env={**env, "FLASH_SIGMOID_HOPPER": "yes"}, capture_output=True, text=True)
    assert out.returncode != 0 and "FLASH_SIGMOID_HOPPER must be 1 (the Gluon forward on Hopper) or 0" in out.stderr


def test_bad_input_is_one_clear_value_error():
    q, k, v = make_inputs(1, 4, 2, 16, 16, torch.float32, 1)
    bad = [
        ((q[0], k, v), "(B, H, T, D)"),
        ((q, k[:, :, :8], v[:, :, :8]), "must be (B="),
        ((q, k.half(), v), "one dtype"),
        ((q.long(), k.long(), v.long()), "one dtype"),
        ((q[:, :3], k, v), "multiple of key/value heads"),
        ((q[..., :12], k[..., :12], v[..., :12]), "head dim 12 is not supported"),
        ((q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)), None),  # (.., 16, 16): stride check
    ]
    for args, words in bad:
        with pytest.raises(ValueError) as e:
            fs.flash_sigmoid(*args)
        assert "\n" not in str(e.value)
        if words:
            assert words in str(e.value)
    with pytest.raises(ValueError, match=r"sigmoid_bias must be a \(4,\) tensor"):
        fs.flash_sigmoid(q, k, v, sigmoid_bias=torch.zeros(3))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H_kv=st.integers(1, 2), group=st.integers(1, 2), T=st.integers(1, 40),
       D=st.sampled_from([16, 32]), causal=st.booleans(), alibi=st.booleans(),
       bias=st.floats(-8.0, 3.0), seed=st.integers(0, 2**16))
def test_kernel_equals_float64_on_random_shapes_and_biases(B, H_kv, group, T, D, causal, alibi, bias, seed):
    H = H_kv * group
    q, k, v = make_inputs(B, H, H_kv, T, D, torch.float32, seed)
    slopes = torch.rand(H, device=DEVICE) if alibi else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fs.flash_sigmoid(*leaves, causal=causal, sigmoid_bias=bias, alibi_slopes=slopes)
    do = torch.randn_like(out)
    out.backward(do)
    ref_leaves = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    ref = sigmoid_attention_f64(*ref_leaves, causal, [bias] * H, slopes)
    ref.backward(do.double().cpu())
    assert rel_err(out.cpu(), ref) < fp32_bound(1e-5)
    for got, want in zip(leaves, ref_leaves):
        assert rel_err(got.grad.cpu(), want.grad) < fp32_bound(1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA GPU (TRITON_INTERPRET unset)")
def test_cuda_graph_replays_draw_a_new_dropout_mask_each_step():
    """train.py compiles with mode="reduce-overhead" on a GPU: the seed the mask comes from is drawn
    inside the captured graph, so each replay must draw a new one, not repeat the captured step's."""
    from torch._dynamo.utils import counters
    q, k, v = (t.requires_grad_() for t in make_inputs(2, 2, 2, 64, 32, torch.bfloat16, 5))
    undropped = fs.flash_sigmoid(q, k, v).detach()
    compiled = torch.compile(lambda q, k, v: fs.flash_sigmoid(q, k, v, dropout_p=0.5), mode="reduce-overhead")
    counters.clear()
    outs = []
    for _ in range(5):  # a warm-up run, the capture, then replays
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(q, k, v)
        out.sum().backward()
        outs.append(out.detach().clone())
        q.grad = k.grad = v.grad = None  # as train.py's zero_grad: a replay overwrites the last backward's outputs
    assert counters["inductor"]["cudagraph_skips"] == 0  # the steps did run as CUDA graphs
    assert all(not torch.equal(o, undropped) for o in outs)  # dropout on
    assert all(not torch.equal(a, b) for i, a in enumerate(outs) for b in outs[i + 1:])
