"""bench_attention.py's peers that switch flash_sigmoid's dQ path (the timing itself needs a CUDA GPU)."""
import math
import sys
from pathlib import Path

import pytest
import torch

import flash_sigmoid as fs
from tests.attention_float64 import rel_err, sigmoid_attention_f64

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not fs.INTERPRET else "cpu"


@pytest.mark.parametrize("fused", [True, False])
def test_dq_switch_holds_through_the_backward_and_matches_float64(monkeypatch, fused):
    """The fused_dq / own_dq peers must differ in the backward, which runs after the forward
    returned: the dQ kernel launches for own_dq only, each at a shape where the default does the other."""
    default = (1 << 30, 1 << 30) if fused else (0, 0)  # fuses nowhere / everywhere
    monkeypatch.setattr(fs, "FUSE_DQ_MIN_HEAD_DIM", default[0])
    monkeypatch.setattr(fs, "FUSE_DQ_MIN_T", default[1])
    launches, kernel = [], fs._bwd_dq_kernel
    monkeypatch.setattr(fs, "_bwd_dq_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or kernel[grid]})())
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 21, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 2, 21, 32, device=DEVICE)
    out = bench_attention.DQSwitch.apply(q, k, v, True, 0.0, fused)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert len(launches) == (0 if fused else 1)
    assert (fs.FUSE_DQ_MIN_HEAD_DIM, fs.FUSE_DQ_MIN_T) == default  # restored
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref = sigmoid_attention_f64(*ref_in, True, [-math.log(21)] * 2)
    assert rel_err(out.cpu(), ref) < 1e-5
    for got, want in zip(grads, torch.autograd.grad(ref, ref_in, do.double().cpu())):
        assert rel_err(got.cpu(), want) < 1e-5
