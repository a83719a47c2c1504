"""compare_runs.py: the DDP check's numbers from log.jsonl files."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_log(folder, losses, tokens_per_s, log_interval=10):
    folder.mkdir()
    with open(folder / "log.jsonl", "w") as f:
        for it, loss in zip(range(0, 10 * len(losses), log_interval), losses):
            f.write(json.dumps({"iter": it, "loss": loss, "tokens_per_s": tokens_per_s}) + "\n")


def compare(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "compare_runs.py"), *args], capture_output=True, text=True)


def test_reports_loss_difference_and_scaling_per_gpu(tmp_path):
    write_log(tmp_path / "one", [5.0, 4.0, 3.0, 2.5, 2.0, 1.8], 1000.0)
    write_log(tmp_path / "four", [5.0, 4.0, 3.0, 2.5, 2.01, 1.8], 3600.0)  # 90% of 4 x 1000
    result = compare(f"{tmp_path / 'one'}:1", f"{tmp_path / 'four'}:4")
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert "max |loss - first run's| 0.0100" in last and "900 per GPU" in last and "scaling efficiency 90.0%" in last


def test_bad_arguments_are_one_line(tmp_path):
    write_log(tmp_path / "run", [5.0], 1.0)
    for arg, words in ((f"{tmp_path / 'run'}:0", "whole number >= 1"), (str(tmp_path / "missing"), "not found")):
        result = compare(arg)
        assert result.returncode != 0 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
