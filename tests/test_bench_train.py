"""bench_train.py's argument checks (the benchmark itself needs a CUDA GPU)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the repository root


def test_an_unknown_loss_kind_is_one_line():
    result = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--losses=plain,fused"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: --losses takes chunked and/or plain, got 'plain,fused'"]


def test_largest_batch_with_cuda_graphs_is_one_line():
    result = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--largest_batch", "--cuda_graphs"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --largest_batch sizes batches by peak memory, which --cuda_graphs does not count (the graphs' own "
        "pool): drop one of them"]


def test_a_vocabulary_below_one_is_one_line():
    result = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--vocab_size=0"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --vocab_size must be at least 1 (65 for the character presets), got 0"]


def test_gradient_accumulation_below_one_or_with_cuda_graphs_is_one_line():
    for args, line in [(["--grad_accum=0"], "error: --grad_accum must be at least 1 (micro-steps per optimizer "
                                            "step), got 0"),
                       (["--grad_accum=40", "--cuda_graphs"], "error: --cuda_graphs replays each micro-step's graph "
                        "over the last one's gradients, as train.py refuses too: drop one of --grad_accum and "
                        "--cuda_graphs")]:
        result = subprocess.run([sys.executable, "benchmarks/bench_train.py", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [line]
