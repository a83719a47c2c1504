"""kernel_resources.py compiles the real kernels for an H100 on a machine without a GPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

import flash_sigmoid
import flash_sigmoid_hopper

HERE = Path(__file__).resolve().parent.parent  # the repository root


def run(*args, interpret=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "benchmarks/kernel_resources.py", *args], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=600)


def test_reports_registers_spills_and_shared_memory_per_config():
    out = run("--head-dims", "16", "--kernels", "fwd", "--causal", "yes")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("fwd")]
    assert len(rows) == 6  # one per forward autotune config
    for row in rows:
        registers, spill, shared_kib = int(row[-4]), int(row[-3]), float(row[-2])
        assert 16 <= registers <= 255 and spill >= 0 and 0 < shared_kib <= 227 and row[-1] in ("async", "serial")


def test_wgmma_serialized_reads_ptxas_performance_note():
    note = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
            "non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline "
            "stage in the function '_fwd_kernel'\nptxas info    : Used 167 registers")
    probe = ("import sys; sys.path.insert(0, 'benchmarks'); from kernel_resources import wgmma_serialized; "
             "print(wgmma_serialized(sys.argv[1]), wgmma_serialized(sys.argv[2]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script refuses the interpreter
    out = subprocess.run([sys.executable, "-c", probe, note, "ptxas info    : Used 170 registers, used 1 barriers"],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False"]


def test_refuses_the_interpreter_and_bad_arguments_in_one_line():
    out = run(interpret=True)
    assert out.returncode != 0 and "unset TRITON_INTERPRET" in out.stderr
    out = run("--kernels", "fwd,bwd")
    assert out.returncode != 0 and re.search(r"--kernels takes fwd, dkdv, dq(, hopper)?; got .bwd.", out.stderr)
    out = run("--head-dims", "48")
    assert out.returncode != 0 and "--head-dims takes 16, 32, 64, 128 (the kernel's); got 48" in out.stderr


def test_loop_counts_the_inner_loop_and_sees_the_dropout_keep_test():
    counts = {}
    for dropout in ([], ["--dropout"]):
        out = run("--head-dims", "16", "--kernels", "fwd", "--causal", "no", "--loop", *dropout)
        assert out.returncode == 0, out.stderr[-2000:]
        rows = [re.search(r"\)\s+\d+\s+\d+\s+[\d.]+\s+(?:async|serial)\s+(\d+) \((.*)\)$", line) for line in out.stdout.splitlines()
                if line.startswith("fwd")]
        assert len(rows) == 6 and all(rows)
        counts[bool(dropout)] = [int(row.group(1)) for row in rows]
        assert all("MUFU" in row.group(2) or "FFMA" in row.group(2) for row in rows)  # tanh and its fma
    # the keep test (a multiply, a compare and a select per score) adds to every config's loop
    assert all(with_dropout > without for with_dropout, without in zip(counts[True], counts[False]))


@pytest.mark.skipif(flash_sigmoid_hopper.gluon is None, reason="this Triton has no Gluon")
def test_compiles_the_gluon_hopper_forward_without_spills():
    """The Gluon forward exists to overlap the tensor cores with the sigmoid: with the Triton that turns
    it on by default, ptxas must keep its wgmmas asynchronous (it serializes them when it cannot prove
    the overlap safe, as Triton 3.9's does for the causal kernel)."""
    out = run("--head-dims", "128", "--kernels", "hopper", "--dtype", "fp16")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("hopper")]
    assert [row[2] for row in rows] == ["False", "True"]  # causal both ways
    for row in rows:
        registers, spill, shared_kib, wgmma = int(row[-4]), int(row[-3]), float(row[-2]), row[-1]
        assert registers <= 255 and spill == 0 and 0 < shared_kib <= 227 and wgmma in ("async", "serial")
        if triton.__version__.startswith(flash_sigmoid.HOPPER_TRITON):
            assert wgmma == "async"
    out = run("--kernels", "hopper", "--dropout")
    assert out.returncode != 0 and "the hopper forward has no dropout or ALiBi" in out.stderr
