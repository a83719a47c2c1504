"""train.py end to end on the CPU: tiny models on a tiny made-up text, each run a subprocess."""
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from prepare_data import prepare

REPO = Path(__file__).resolve().parent.parent  # the repository root
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--dropout=0", "--compile=false", "--sample_tokens=0", "--log_interval=1", "--warmup_iters=5",
        "--learning_rate=3e-3", "--lr_decay_iters=100"]
TIMING = ("ms_per_iter", "tokens_per_s", "mfu")  # the only log fields that differ between equal runs


def make_text(seed, words, n_chars=40_000):
    """Sentences of random words: a text a tiny model learns something about in a few steps."""
    rng, lines = random.Random(seed), []
    while sum(map(len, lines)) < n_chars:
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + ".\n")
    return "".join(lines)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """data/tiny (lower-case words) and data/other (upper-case words: another vocabulary)."""
    root = tmp_path_factory.mktemp("data")
    for name, words in (("tiny", "the king queen of and to my lord thou art love death sweet night day".split()),
                        ("other", "WHAT IS THIS NOW SIR GOOD MADAM NAY AY".split())):
        (root / f"{name}.txt").write_text(make_text(0, words))
        prepare(name, root / "data", input_path=root / f"{name}.txt", tokenizer="char")
    return root / "data"


def train(data_dir, out_dir, *args, timeout=120, env=None):
    return subprocess.run(command(data_dir, out_dir, *args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def command(data_dir, out_dir, *args, launcher=(sys.executable,)):
    return [*launcher, "train.py", "presets/shakespeare_char_cpu.toml", *TINY, "--dataset=tiny",
            f"--data_dir={data_dir}", f"--out_dir={out_dir}", *args]


def log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def error_line(result, code=1):
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A finished 10-step run; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("trained") / "out"
    result = train(data_dir, out, "--max_iters=10", "--eval_interval=5")
    assert result.returncode == 0, result.stderr
    return out


def copy_of(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "out"))


def wait_for(condition, proc, what, timeout=60):
    end = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"train.py exited ({proc.returncode}) before {what}"
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.002)


def n_lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


# ----------------------------------------------------------------------------- training works

@pytest.mark.parametrize("attn", ["softmax", "sigmoid"])
def test_a_few_steps_lower_the_loss(data_dir, tmp_path, attn):
    result = train(data_dir, tmp_path / "out", f"--attn={attn}", "--max_iters=60", "--eval_interval=60",
                   "--log_interval=10", "--sample_tokens=20")
    assert result.returncode == 0, result.stderr
    records = log(tmp_path / "out")
    assert [r["iter"] for r in records] == [0, 10, 20, 30, 40, 50, 60]
    first, last = records[0], records[-1]
    assert last["val_loss"] < first["val_loss"] - 0.4 and records[-2]["loss"] < first["loss"] - 0.4
    assert set(first) == {"iter", "loss", "lr", "ms_per_iter", "tokens_per_s", "mfu", "train_loss", "val_loss",
                          "copy_loss"}
    assert first["mfu"] is None  # no known peak on a CPU
    assert re.search(r"^iter 10/60 \(18%\): loss [0-9.]+, lr [0-9.e+-]+, [0-9.]+ ms/iter, [0-9,]+ tok/s, "
                     r"\d+s elapsed, ETA \d+s$", result.stdout, re.M), result.stdout
    assert "mfu" not in result.stdout  # no line says "mfu n/a"
    assert f"best val loss {last['val_loss']:.4f}" in result.stdout and "sample of 20 tokens:" in result.stdout
    ckpt = load(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] == 60 and ckpt["model_args"]["attn"] == attn and ckpt["dataset_meta"]["name"] == "tiny"
    assert ckpt["config"]["max_iters"] == 60 and set(ckpt["rng"]) == {"torch", "train_data"}


def test_attention_norms_are_logged(data_dir, tmp_path):
    result = train(data_dir, tmp_path / "out", "--attn=sigmoid", "--log_attn_norm", "--max_iters=2", "--eval_interval=10")
    assert result.returncode == 0, result.stderr
    assert all(len(r["attn_out_norm"]) == 2 for r in log(tmp_path / "out") if "loss" in r)
    assert "attn out norm " in result.stdout


def test_resume_continues_bit_exact(data_dir, tmp_path):
    """20 steps straight == 10 steps, stop, resume to 20: the same losses to the last bit (dropout on,
    2 micro-steps per step, so the RNG, optimizer and data-stream states all have to come back)."""
    args = ["--dropout=0.1", "--gradient_accumulation_steps=2", "--eval_interval=10", "--always_save_checkpoint",
            "--lr_decay_iters=20"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(data_dir, straight, *args, "--max_iters=20").returncode == 0
    assert train(data_dir, resumed, *args, "--max_iters=10").returncode == 0
    assert load(resumed / "ckpt.pt")["iter_num"] == 10
    result = train(data_dir, resumed, *args, "--max_iters=20", "--init_from=resume")
    assert result.returncode == 0, result.stderr
    expected = without_timing(log(straight))
    assert [r["iter"] for r in expected] == list(range(21))
    assert without_timing(log(resumed)) == expected


def test_eval_only_reports_the_checkpoint_without_writing(data_dir, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    before = (out / "ckpt.pt").read_bytes(), (out / "log.jsonl").read_text()
    result = train(data_dir, out, "--init_from=resume", "--eval_only")
    assert result.returncode == 0, result.stderr
    assert "iter 10: train loss" in result.stdout and "best val loss" in result.stdout
    assert ((out / "ckpt.pt").read_bytes(), (out / "log.jsonl").read_text()) == before


def test_default_preset_and_dataset_are_prepared(tmp_path):
    result = subprocess.run([sys.executable, "train.py", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}",
                             "--max_iters=0", "--eval_iters=1", "--sample_tokens=5"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no preset given: using presets/shakespeare_char" in result.stdout
    assert (tmp_path / "data" / "shakespeare_char" / "meta.json").is_file()
    assert "sample of 5 tokens:" in result.stdout


def test_runs_that_differ_do_not_share_an_out_dir(data_dir, tmp_path):
    """The preset's out_dir names the attention kind, so --attn=sigmoid then --attn=softmax leave two
    runs; a new run into a folder holding another config's checkpoint stops unless --overwrite."""
    def run(*args):  # no --out_dir: the preset's, relative to the working directory
        cmd = [sys.executable, str(REPO / "train.py"), str(REPO / "presets/shakespeare_char_cpu.toml"), *TINY,
               "--dataset=tiny", f"--data_dir={data_dir}", "--max_iters=2", "--eval_interval=2", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    for attn in ("sigmoid", "softmax"):
        assert run(f"--attn={attn}").returncode == 0
    for attn in ("sigmoid", "softmax"):
        assert load(tmp_path / f"out-shakespeare-char-cpu-{attn}" / "ckpt.pt")["model_args"]["attn"] == attn
    ckpt = tmp_path / "out-shakespeare-char-cpu-sigmoid" / "ckpt.pt"
    before = ckpt.read_bytes()
    line = error_line(run("--attn=sigmoid", "--n_layer=3", "--learning_rate=1e-3"))
    assert line == ("error: out-shakespeare-char-cpu-sigmoid/ckpt.pt holds another run (n_layer=2, learning_rate=0.003; this run: n_layer=3, "
                    "learning_rate=0.001): choose another --out_dir, or add --overwrite to replace it")
    assert ckpt.read_bytes() == before
    assert run("--attn=sigmoid", "--max_iters=2").returncode == 0  # the same config again: a rerun
    assert run("--attn=sigmoid", "--n_layer=3", "--overwrite").returncode == 0
    assert load(ckpt)["model_args"]["n_layer"] == 3
    line = error_line(run("--out_dir=out-{atn}"), code=2)
    assert "--out_dir='out-{atn}' names {atn}, which is not a config key" in line


def first_lines_of(cmd, until, timeout=120):
    """Run cmd until a stdout line contains `until`, then stop it: the lines up to that one."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, end = [], time.time() + timeout
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if until in line or time.time() > end:
                break
    finally:
        proc.kill()
        proc.wait()
    return lines


def test_a_long_cpu_run_with_a_gpu_preset_warns_once_early(data_dir, tmp_path):
    gpu_preset = command(data_dir, tmp_path / "out", "--max_iters=10000000", "--eval_interval=10000000")
    gpu_preset[2] = "presets/shakespeare_char.toml"
    lines = first_lines_of(gpu_preset, "warning:")
    assert re.fullmatch(r"warning: at this speed the run ends in about \d+h\d\dm on the CPU; "
                        r"presets/shakespeare_char_cpu.toml trains a smaller model in minutes", lines[-1]), lines
    assert [line.split(":")[0] for line in lines[-4:-1]] == [f"iter {i}/10000000 (0%)" for i in range(3)]
    assert sum("warning" in line for line in lines) == 1


def test_compiling_is_announced(data_dir, tmp_path):
    lines = first_lines_of(command(data_dir, tmp_path / "out", "--compile=true"), "compiling the")
    assert lines[-1] == "compiling the model: the first step takes longer (--compile=false skips this)"


# ----------------------------------------------------------------------------- interruptions and faults

def test_kill_9_during_training_keeps_a_loadable_checkpoint(data_dir, tmp_path):
    """kill -9 at two moments, one while a checkpoint is being written (it writes one every step)."""
    out = tmp_path / "out"
    cmd = command(data_dir, out, "--max_iters=150", "--eval_interval=1", "--always_save_checkpoint")
    for moment in ("after some steps", "during a checkpoint write"):
        start = n_lines(out / "log.jsonl")
        with open(tmp_path / "stdout", "w") as stdout:
            proc = subprocess.Popen(cmd + ["--init_from=resume"] * (moment != "after some steps"), cwd=REPO,
                                    stdout=stdout, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: (out / "ckpt.pt").exists() and n_lines(out / "log.jsonl") >= start + 5, proc, "5 steps")
            if moment == "during a checkpoint write":
                wait_for(lambda: (out / "ckpt.pt.tmp").exists(), proc, "a checkpoint write")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, (tmp_path / "stdout").read_text()
        assert load(out / "ckpt.pt")["iter_num"] >= 1
    result = subprocess.run(cmd + ["--init_from=resume"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = log(out)
    assert [r["iter"] for r in records] == list(range(151))  # the log was cut back to the checkpoint: no gaps, no repeats
    assert load(out / "ckpt.pt")["iter_num"] == 150


@pytest.mark.parametrize("sigs,started_ignoring_it", [  # ignoring: as a shell starts a script's background job
    ([signal.SIGINT], False), ([signal.SIGINT], True), ([signal.SIGTERM], False),  # SIGTERM: `kill`, `timeout`
    ([signal.SIGHUP], False),  # a closed terminal
    ([signal.SIGTERM, signal.SIGINT], False)],  # `timeout` signals ablate.py's group, which sends its runs SIGINT
    ids=["ctrl-c", "ctrl-c-ignored-at-start", "kill", "hangup", "kill-then-ctrl-c"])
def test_ctrl_c_keeps_last_checkpoint(data_dir, tmp_path, sigs, started_ignoring_it):
    out = tmp_path / "out"

    def as_a_terminal_starts_it():  # whatever started the tests (nohup ignores SIGHUP, say)
        for sig in sigs:
            signal.signal(sig, signal.SIG_DFL)
        if started_ignoring_it:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    proc = subprocess.Popen(command(data_dir, out, "--max_iters=100000", "--eval_interval=5"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_a_terminal_starts_it)
    try:
        wait_for(lambda: (out / "ckpt.pt").exists() and n_lines(out / "log.jsonl") >= 12, proc, "a checkpoint")
    finally:
        for sig in sigs:
            proc.send_signal(sig)
        try:
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()  # a run that did not stop must not outlive the test
    assert proc.returncode == 130, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    iter_num = load(out / "ckpt.pt")["iter_num"]
    assert f"the last good checkpoint is {out / 'ckpt.pt'} (iter {iter_num})" in stderr
    assert stderr.strip().endswith("--init_from=resume") and not (out / "ckpt.pt.tmp").exists()


def test_a_second_signal_within_5_s_lets_the_first_stop_finish(monkeypatch):
    """A kill of ablate.py's process group reaches a run twice (the kill, then ablate.py's SIGINT): the
    second must not cut the resume message short; one 5 s later stops a stop that hangs."""
    import train as train_module
    now = [100.0]
    monkeypatch.setattr(train_module.time, "monotonic", lambda: now[0])
    monkeypatch.setitem(train_module.progress, "stopped_at", None)
    with pytest.raises(KeyboardInterrupt):
        train_module.stop_as_ctrl_c(signal.SIGTERM, None)
    now[0] += 4.9
    assert train_module.stop_as_ctrl_c(signal.SIGINT, None) is None
    now[0] += 0.2
    with pytest.raises(KeyboardInterrupt):
        train_module.stop_as_ctrl_c(signal.SIGINT, None)


def test_a_stop_during_a_save_waits_for_its_end(monkeypatch):
    """A signal between the rename of ckpt.pt and the rest of the save (best.pt, the resume line's
    iteration) would leave them naming the previous save: it is raised when the save is done."""
    import train as train_module
    monkeypatch.setitem(train_module.progress, "stopped_at", None)
    monkeypatch.setitem(train_module.progress, "ckpt_iter", 20)
    previous = signal.signal(signal.SIGINT, train_module.stop_as_ctrl_c)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with train_module.stops_wait_for_the_save():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("best.pt")
                train_module.progress["ckpt_iter"] = 40
    finally:
        signal.signal(signal.SIGINT, previous)
    assert done == ["best.pt"] and train_module.progress["ckpt_iter"] == 40
    assert not train_module.progress["saving"] and not train_module.progress["stop_after_save"]


@pytest.mark.parametrize("eval_interval", [2, 1])  # 1: an eval is the first to see the broken weights
def test_nan_loss_stops_with_one_line(data_dir, trained, tmp_path, eval_interval):
    out = copy_of(trained, tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    result = train(data_dir, out, "--init_from=resume", "--max_iters=30", f"--eval_interval={eval_interval}",
                   "--always_save_checkpoint",
                   "--learning_rate=1e30", "--min_lr=1e30", "--warmup_iters=0")
    line = error_line(result)
    assert "loss became nan at iter 11" in line or "loss became inf at iter 11" in line, line
    assert f"the last good checkpoint is {out / 'ckpt.pt'} (iter 10)" in line
    assert (out / "ckpt.pt").read_bytes() == before


def test_the_end_of_a_run_keeps_the_best_checkpoint(data_dir, trained, tmp_path):
    """ckpt.pt is the latest state (resume point), best.pt the lowest val loss; a worse end leaves
    best.pt alone, and the last lines say which file holds which, with both losses."""
    out = copy_of(trained, tmp_path)
    best = load(out / "best.pt")
    assert best["iter_num"] == 10 and best["best_iter"] == 10
    result = train(data_dir, out, "--init_from=resume", "--max_iters=14", "--eval_interval=2",
                   "--learning_rate=1", "--min_lr=1", "--warmup_iters=0")  # too high: val loss gets worse
    assert result.returncode == 0, result.stderr
    latest = load(out / "ckpt.pt")
    assert latest["iter_num"] == 14 and load(out / "best.pt")["iter_num"] == 10
    assert latest["val_loss"] > best["val_loss"] == latest["best_val_loss"]
    assert result.stdout.strip().splitlines()[-2:] == [
        f"best val loss {best['val_loss']:.4f} (iter 10): {out / 'best.pt'}, the model sample.py reads",
        f"latest: iter 14, val loss {latest['val_loss']:.4f}: {out / 'ckpt.pt'}, which --init_from=resume continues"]


def test_full_disk_keeps_the_old_checkpoint(data_dir, trained, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to simulate a full disk")
    out = copy_of(trained, tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt.tmp").symlink_to("/dev/full")  # the checkpoint is written here first: every write fails
    line = error_line(train(data_dir, out, "--init_from=resume", "--max_iters=12", "--eval_interval=2"))
    assert "could not write" in line and "No space left on device" in line and "previous checkpoint is kept" in line
    assert (out / "ckpt.pt").read_bytes() == before


def test_unwritable_out_dir(data_dir, tmp_path):
    (tmp_path / "file").write_text("a file, so no folder can be made under it (chmod can't stop root)")
    line = error_line(train(data_dir, tmp_path / "file" / "out", "--max_iters=1"))
    assert "cannot write to --out_dir" in line and "Not a directory" in line


# ----------------------------------------------------------------------------- user errors: one line each

def test_missing_dataset_prints_the_command(data_dir, tmp_path):
    line = error_line(train(data_dir, tmp_path / "out", "--dataset=nosuch"))
    assert "meta.json not found" in line and "python prepare_data.py --input=PATH --name=nosuch" in line
    line = error_line(train(tmp_path / "empty", tmp_path / "out", "--dataset=tinyshakespeare"))
    assert "python prepare_data.py tinyshakespeare" in line


def test_truncated_bin_is_one_line(data_dir, tmp_path):
    shutil.copytree(data_dir / "tiny", tmp_path / "data" / "tiny")
    train_bin = tmp_path / "data" / "tiny" / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-1])
    line = error_line(train(tmp_path / "data", tmp_path / "out"))
    assert "train.bin is truncated or corrupt" in line and "--force" in line


def test_too_few_tokens_gives_advice_that_works(tmp_path):
    for val_tokens, block_size, message in (
            (2, 5, "val.bin has 2 tokens, too few for block_size=5: use --block_size=1 or less, or more text"),
            (1, 1, "val.bin has 1 token, too few for block_size=1: prepare the dataset from more text")):
        (tmp_path / "t.txt").write_text("abcdefghijklmnopqrst")  # 20 chars: train 18, val 2 tokens
        folder = prepare("short", tmp_path / "data", input_path=tmp_path / "t.txt", tokenizer="char", force=True)
        meta = json.loads((folder / "meta.json").read_text())  # shorten val.bin by hand: prepare refuses 1 token
        (folder / "val.bin").write_bytes((folder / "val.bin").read_bytes()[:val_tokens * np.dtype(meta["dtype"]).itemsize])
        (folder / "meta.json").write_text(json.dumps({**meta, "val_tokens": val_tokens}))
        line = error_line(train(tmp_path / "data", tmp_path / "out", "--dataset=short", f"--block_size={block_size}"))
        assert line.endswith(message), line


def test_resume_from_other_architecture_is_one_line(data_dir, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    line = error_line(train(data_dir, out, "--init_from=resume", "--n_layer=3", "--attn=sigmoid"))
    assert "another architecture" in line and "n_layer=2, attn=softmax" in line and "n_layer=3, attn=sigmoid" in line
    line = error_line(train(data_dir, out, "--init_from=resume", "--dataset=other"))
    assert "another dataset" in line and "'tiny'" in line and "'other'" in line
    assert train(data_dir, out, "--init_from=resume", "--dropout=0.1", "--max_iters=11").returncode == 0


def test_resume_accepts_a_checkpoint_with_an_eval_data_stream(data_dir, trained, tmp_path):
    """Checkpoints written before evaluation scored fixed windows also hold the state of a random eval
    stream: it is no longer used, and such a checkpoint resumes."""
    out = copy_of(trained, tmp_path)
    ckpt = load(out / "ckpt.pt")
    ckpt["rng"]["eval_data"] = torch.Generator().manual_seed(1338).get_state()
    torch.save(ckpt, out / "ckpt.pt")
    result = train(data_dir, out, "--init_from=resume", "--max_iters=11")
    assert result.returncode == 0, result.stderr
    assert load(out / "ckpt.pt")["iter_num"] == 11 and "eval_data" not in load(out / "ckpt.pt")["rng"]


def test_resume_applies_this_runs_optimizer_settings(data_dir, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    result = train(data_dir, out, "--init_from=resume", "--weight_decay=0.5", "--beta2=0.95", "--max_iters=11")
    assert result.returncode == 0, result.stderr
    groups = load(out / "ckpt.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]  # decayed, not decayed
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in groups)


FAKE_GPT2 = """# runs the script in argv[1] with GPT.from_pretrained replaced: no network, GPT-2's shape made tiny
import runpy, sys
sys.path.insert(0, {repo!r})
from model import GPT, GPTConfig

def from_pretrained(model_type, override_args):
    args = {{k: v for k, v in override_args.items() if k != "n_kv_head"}}
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, bias=True, vocab_size=50257, **args))

GPT.from_pretrained = staticmethod(from_pretrained)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.usefixtures("gpt2_encoding")  # GPT-2 tokens: tiktoken's or a stand-in (conftest.py)
def test_gpt2_finetune_resumes_with_the_same_command(tmp_path):
    """The resume command train.py prints on Ctrl-C is the run's own command + --init_from=resume: the
    GPT-2 shape (1 layer, bias) differs from the preset's, and must come from the checkpoint."""
    (tmp_path / "t.txt").write_text(make_text(0, ["to", "be", "or", "not"], 2000))
    prepare("bpe", tmp_path / "data", input_path=tmp_path / "t.txt", tokenizer="gpt2")
    (tmp_path / "fake_gpt2.py").write_text(FAKE_GPT2.format(repo=str(REPO)))

    def run(*args):
        cmd = command(tmp_path / "data", tmp_path / "out", "--dataset=bpe", "--init_from=gpt2", "--eval_interval=2",
                      *args, launcher=(sys.executable, str(tmp_path / "fake_gpt2.py")))
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr

    run("--max_iters=2")
    run("--max_iters=4", "--init_from=resume")  # as printed on Ctrl-C: the same command + --init_from=resume
    ckpt = load(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] == 4 and ckpt["model_args"]["n_layer"] == 1 and ckpt["model_args"]["bias"]
    assert ckpt["config"]["init_from"] == "gpt2"  # so that the same command resumes it again


def test_resume_without_checkpoint(data_dir, tmp_path):
    line = error_line(train(data_dir, tmp_path / "out", "--init_from=resume"))
    assert f"no checkpoint at {tmp_path / 'out' / 'ckpt.pt'}" in line


@pytest.mark.usefixtures("gpt2_encoding")
def test_gpt2_init_is_one_line_without_its_dataset_or_weights(data_dir, tmp_path):
    line = error_line(train(data_dir, tmp_path / "out", "--init_from=gpt2"))
    assert "needs a GPT-2-tokenized dataset" in line
    (tmp_path / "t.txt").write_text(make_text(0, ["to", "be", "or", "not"], 2000))
    prepare("bpe", tmp_path / "data", input_path=tmp_path / "t.txt", tokenizer="gpt2")  # TIKTOKEN_CACHE_DIR: conftest.py
    line = error_line(train(tmp_path / "data", tmp_path / "out", "--init_from=gpt2", "--dataset=bpe"))
    assert "pip install transformers" in line or "could not get the gpt2 weights" in line  # no network here


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_missing_is_one_line(data_dir, tmp_path):
    assert "pip install wandb" in error_line(train(data_dir, tmp_path / "out", "--wandb_log"), code=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_requested_without_gpu(data_dir, tmp_path):
    line = error_line(train(data_dir, tmp_path / "out", "--device=cuda"), code=2)
    assert "--device=cuda" in line and "no CUDA GPU" in line and not (tmp_path / "out").exists()
    line = error_line(train(data_dir, tmp_path / "out", "--dtype=float16"), code=2)
    assert "float16 is for CUDA GPUs" in line


def test_bad_config_key_exit_2(data_dir, tmp_path):
    line = error_line(train(data_dir, tmp_path / "out", "--learnig_rate=1e-3"), code=2)
    assert "did you mean 'learning_rate'?" in line
    line = error_line(train(data_dir, tmp_path / "out", "--n_embd=33"), code=2)  # attention.check_attention_config
    assert "not divisible by n_head" in line
    line = error_line(train(data_dir, tmp_path / "out", "--eval_interval=0"), code=2)
    assert "--eval_interval must be at least 1" in line


@pytest.mark.parametrize("arg, message", [
    ("--grad_clip=-1", "--grad_clip must be 0 or more"),  # 0 = no clipping; below 0 would flip the gradients
    ("--beta2=1", "--beta2 must be at least 0 and below 1"),
    ("--n_embd=0", "--n_embd must be at least 1"),
    ("--learning_rate=0", "--learning_rate must be more than 0"),
])
def test_out_of_range_value_exit_2(data_dir, tmp_path, arg, message):
    assert message in error_line(train(data_dir, tmp_path / "out", arg, "--max_iters=0"), code=2)


def test_cuda_graphs_follow_the_run_and_refuse_what_they_cannot_replay(data_dir, tmp_path):
    """auto: CUDA graphs for one compiled process on a GPU without gradient accumulation, else off;
    true where they cannot run is one line, before anything is written."""
    from types import SimpleNamespace

    import train as train_module
    cfg = lambda **kw: SimpleNamespace(**{"compile": True, "cuda_graphs": None, "gradient_accumulation_steps": 1, **kw})
    use = train_module.use_cuda_graphs
    assert use(cfg(), "cuda", ddp=False, accum=1)
    assert not use(cfg(gradient_accumulation_steps=2), "cuda", ddp=True, accum=1)
    assert not use(cfg(gradient_accumulation_steps=2), "cuda", ddp=False, accum=2)
    assert not use(cfg(compile=False), "cuda", ddp=False, accum=1)
    assert not use(cfg(), "cpu", ddp=False, accum=1)
    assert not use(cfg(cuda_graphs=False), "cuda", ddp=False, accum=1)
    # asked for under DDP with one micro-step a rank (2 in all on 2 ranks): not measured, not refused
    assert use(cfg(cuda_graphs=True, gradient_accumulation_steps=2), "cuda", ddp=True, accum=1)
    with pytest.raises(train_module.ConfigError, match=r"over 4 micro-steps a rank \(--gradient_accumulation_steps=8\)"):
        use(cfg(cuda_graphs=True, gradient_accumulation_steps=8), "cuda", ddp=True, accum=4)
    line = error_line(train(data_dir, tmp_path / "out", "--cuda_graphs=true"), code=2)
    assert line.startswith("error: --cuda_graphs=true replays compiled CUDA graphs: it needs --compile=true and a CUDA "
                           "device") and not (tmp_path / "out").exists()


def test_help_lists_keys():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--attn=<str>" in result.stdout and "--init_from=<str>" in result.stdout
    help_text = " ".join(result.stdout.split())
    preset = "shakespeare_char" if torch.cuda.is_available() else "shakespeare_char_cpu"
    assert f"With no preset given, presets/{preset}.toml is applied first" in help_text
    if preset == "shakespeare_char_cpu":
        assert "It sets out_dir=out-shakespeare-char-cpu-{attn}, eval_iters=20," in help_text
    assert "The defaults listed below are those before any preset." in help_text


# ----------------------------------------------------------------------------- DDP on CPU (gloo)

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def test_ddp_two_cpu_processes_match_one_process(data_dir, tmp_path):
    """2 ranks x 1 micro-step == 1 process x 2 micro-steps: the same batches, so the same losses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--gradient_accumulation_steps=2", "--max_iters=10", "--eval_interval=5", "--backend=gloo"]
    single = subprocess.run(command(data_dir, tmp_path / "one", *args), cwd=REPO, capture_output=True, text=True,
                            timeout=240, env=env)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(command(data_dir, tmp_path / "two", *args, launcher=TORCHRUN), cwd=REPO, capture_output=True,
                         text=True, timeout=240, env=env)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert "(2 ranks x 1 x 4 x 32)" in ddp.stdout and ddp.stdout.count("best val loss") == 1  # rank 0 alone prints
    one, two = without_timing(log(tmp_path / "one")), without_timing(log(tmp_path / "two"))
    assert [r.keys() for r in one] == [r.keys() for r in two] and len(one) == 11
    for a, b in zip(one, two):
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["iter"], key)
    assert load(tmp_path / "two" / "ckpt.pt")["iter_num"] == 10


FAIL_RANK_1 = """# runs train.py with rank 1's training step failing: all ranks must stop
import os, sys
sys.path.insert(0, {repo!r})
import train

def failing_step(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise RuntimeError("rank 1 failing on purpose")
    return real_step(*args, **kwargs)

real_step, train.train_step = train.train_step, failing_step
train.run(sys.argv[1:])
"""


def test_ddp_rank_failure_exits_all_ranks(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    (tmp_path / "fail_rank_1.py").write_text(FAIL_RANK_1.format(repo=str(REPO)))
    cmd = command(data_dir, tmp_path / "out", "--max_iters=1000", "--gradient_accumulation_steps=2",
                  launcher=TORCHRUN)
    cmd[cmd.index("train.py")] = str(tmp_path / "fail_rank_1.py")
    start = time.time()
    result = subprocess.run(cmd,
                            cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode != 0
    assert "[rank 1]" in result.stderr and "failing on purpose" in result.stderr
    assert time.time() - start < 120


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("n_tokens, eval_iters, windows", [
    (5000, 200, 312),  # 312 windows of 16 fit in 200 batches of 4: all of them, 9 passes of 32 and a padded one
    (5000, 11, 44),    # 312 do not fit in 11 batches: 44 evenly spaced, a pass of 32 and a padded one
    (5000, 3, 12),     # fewer than one pass
    (17, 200, 1),      # one window: its 16 inputs and 16 targets take all 17 tokens
])
def test_evaluation_scores_fixed_windows_and_equals_their_mean_loss(tmp_path, n_tokens, eval_iters, windows):
    from types import SimpleNamespace

    import numpy as np

    from model import GPT, GPTConfig
    from train import estimate_loss, eval_offsets, get_batch
    tokens = np.random.default_rng(0).integers(0, 65, n_tokens).astype(np.uint16)
    tokens.tofile(tmp_path / "val.bin")
    splits = {"val": (str(tmp_path / "val.bin"), n_tokens)}
    cfg = SimpleNamespace(block_size=16, batch_size=4, eval_iters=eval_iters, cuda_graphs=False)
    offsets = eval_offsets(n_tokens, cfg)
    assert len(offsets) == windows and len(set(offsets.tolist())) == windows
    assert (offsets % 16 == 0).all() and offsets.max() + 17 <= n_tokens  # whole windows, inside the split
    if windows == 312:
        assert offsets.tolist() == list(range(0, 312 * 16, 16))
    else:  # evenly spaced across the split, not its first windows
        assert offsets.max() >= (312 - 312 // windows - 1) * 16  # within one spacing of the last window
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.5))
    got = estimate_loss(model, splits, "uint16", cfg, nullcontext(), "cpu", 0, 1)
    assert model.training  # back in training mode
    assert estimate_loss(model, splits, "uint16", cfg, nullcontext(), "cpu", 0, 1) == got  # no sampling
    # one window per forward pass, in eval mode, the mean of the window means
    model.eval()
    with torch.no_grad():
        losses = [model(*get_batch(splits["val"][0], "uint16", offsets[k:k + 1], 16, "cpu"))[1] for k in range(windows)]
    assert got["val"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


def test_a_run_reads_its_data_files_to_the_end_when_they_are_replaced(data_dir, tmp_path):
    """prepare_data.py writes a new file and renames it over the old one; a run that started on the
    old one (an ablation's runs, say) keeps reading it, also once it is deleted."""
    import shutil

    import train as train_module
    from configurable import TrainConfig
    copy = tmp_path / "data"
    shutil.copytree(data_dir / "tiny", copy / "tiny")
    cfg = TrainConfig(block_size=32, batch_size=4, dataset="tiny", data_dir=str(copy))
    meta, splits = train_module.load_data(cfg, master=False)
    try:
        ix = torch.tensor([0, 100, 5000])
        before = train_module.get_batch(splits["train"][0], meta["dtype"], ix, 32, "cpu")
        prepare("tiny", copy, input_path=data_dir.parent / "other.txt", tokenizer="char")  # replaces train.bin
        new_file = train_module.get_batch(str(copy / "tiny" / "train.bin"), meta["dtype"], ix, 32, "cpu")
        assert not torch.equal(before[0], new_file[0])
        for got, want in zip(train_module.get_batch(splits["train"][0], meta["dtype"], ix, 32, "cpu"), before):
            assert torch.equal(got, want)
        (copy / "tiny" / "train.bin").unlink()
        for got, want in zip(train_module.get_batch(splits["train"][0], meta["dtype"], ix, 32, "cpu"), before):
            assert torch.equal(got, want)
    finally:
        for file, _ in splits.values():
            file.close()


def test_a_data_file_replaced_between_its_check_and_its_opening_is_one_line(data_dir, tmp_path, monkeypatch):
    """load_data checks a token file's size by its path, then opens it: a file renamed over it in
    between (prepare_data.py writing anew) must not be read with the old file's length."""
    import shutil

    import train as train_module
    from configurable import TrainConfig
    copy = tmp_path / "data"
    shutil.copytree(data_dir / "tiny", copy / "tiny")
    check_bin = train_module.check_bin

    def checked_then_replaced(folder, meta, split):
        tokens = check_bin(folder, meta, split)
        shorter = Path(tokens.filename).with_name("new.bin")
        shorter.write_bytes(Path(tokens.filename).read_bytes()[:-2])
        os.replace(shorter, tokens.filename)
        return tokens
    monkeypatch.setattr(train_module, "check_bin", checked_then_replaced)
    cfg = TrainConfig(block_size=32, batch_size=4, dataset="tiny", data_dir=str(copy))
    with pytest.raises(train_module.TrainError) as e:
        train_module.load_data(cfg, master=False)
    assert str(e.value) == (f"{copy / 'tiny' / 'train.bin'} changed while the run started (prepare_data.py "
                            f"writing it?): run again once it is written")


def test_ranks_split_the_evaluation_windows_and_their_sums_make_the_whole(tmp_path, monkeypatch):
    """Under DDP each rank scores windows rank, rank + world, ...; the all-reduced (sum, count) of all
    ranks is the one-rank evaluation, whatever the number of ranks, also when some ranks get none."""
    from types import SimpleNamespace

    import numpy as np

    import train
    from model import GPT, GPTConfig
    tokens = np.random.default_rng(1).integers(0, 65, 1000).astype(np.uint16)
    tokens.tofile(tmp_path / "val.bin")
    splits = {"val": (str(tmp_path / "val.bin"), len(tokens))}  # 62 windows of 16
    cfg = SimpleNamespace(block_size=16, batch_size=4, eval_iters=200, cuda_graphs=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16))
    whole = train.estimate_loss(model, splits, "uint16", cfg, nullcontext(), "cpu", 0, 1)["val"]
    for world in (3, 100):  # 100 ranks: 38 of them score nothing
        totals = []
        monkeypatch.setattr(train.dist, "all_reduce", lambda t: totals.append(t.clone()))
        for rank in range(world):
            train.estimate_loss(model, splits, "uint16", cfg, nullcontext(), "cpu", rank, world)
        summed = torch.stack(totals).sum(0)
        assert summed[1] == 62 and sum(t[1] == 0 for t in totals) == max(0, world - 62)
        assert (summed[0] / summed[1]).item() == pytest.approx(whole, rel=1e-5)


def test_a_larger_eval_batch_leaves_the_compiled_training_graph_static(tmp_path):
    """train.py compiles with dynamic=False: else the eval pass's other batch size makes torch.compile
    recompile the training step with a symbolic batch size."""
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16))
    graph_inputs = []
    compiled = torch.compile(model, dynamic=False, backend=lambda gm, inputs: graph_inputs.append(inputs) or gm)
    x = torch.zeros(16, 16, dtype=torch.long)
    with torch.no_grad():
        compiled.eval()(x, x)  # an eval pass of 8 batches of 2
    compiled.train()(x[:2], x[:2])[1].backward()
    assert len(graph_inputs) == 2 and all(isinstance(i, torch.Tensor) for i in graph_inputs[1])


# ----------------------------------------------------------------------------- in-context copy probe

class Copier(torch.nn.Module):
    """Predicts, at position t, the token `lag` positions back plus one: with lag = half a perfect
    copier of the probe's repeat, with any other lag a wrong one. loss: mean over targets != -1."""

    def __init__(self, lag, vocab_size=50):
        super().__init__()
        self.lag, self.vocab_size = lag, vocab_size

    def forward(self, x, y):
        source = torch.roll(x, shifts=self.lag - 1, dims=1)  # source[t] = x[t - lag + 1]
        logits = 50.0 * torch.nn.functional.one_hot(source, self.vocab_size).float()  # (B, T, V)
        return logits, torch.nn.functional.cross_entropy(logits.view(-1, self.vocab_size), y.view(-1), ignore_index=-1)


def test_copy_probe_scores_only_the_repeat_and_is_the_same_every_run(tmp_path):
    import dataclasses
    from contextlib import nullcontext
    import numpy as np
    sys.path.insert(0, str(REPO))
    import train as train_module
    from configurable import TrainConfig
    tokens = np.random.default_rng(0).integers(0, 50, 10_000).astype(np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    split = (str(tmp_path / "train.bin"), len(tokens))
    cfg = TrainConfig(block_size=32, batch_size=12)  # 64 probe rows: the last batch is padded

    def probe(model, cfg=cfg):
        return train_module.copy_probe_loss(model, split, "uint16", cfg, nullcontext(), "cpu")

    rng_before = torch.get_rng_state()
    assert probe(Copier(lag=16)) < 1e-6  # a perfect copier of the 16-token run: no loss
    assert probe(Copier(lag=15)) > 10  # one position off: wrong on every scored token
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training and dropout streams untouched
    # the same probe for another seed and batch size: the same loss from a model that depends on the input
    some_model = Copier(lag=3)  # right only where the random run repeats a token 2 positions later
    assert probe(some_model) == pytest.approx(probe(some_model, dataclasses.replace(cfg, seed=7, batch_size=64)))


def test_copy_loss_is_logged_at_evals_and_probes_the_val_split(trained, data_dir):
    import math
    sys.path.insert(0, str(REPO))
    import train as train_module
    from configurable import TrainConfig
    from model import GPT
    evals = [r for r in log(trained) if "val_loss" in r]
    assert evals and all(math.isfinite(r["copy_loss"]) for r in evals)
    # the last eval's model is ckpt.pt: the probe of its val text is the logged one, of its train text another
    cfg = TrainConfig(block_size=32, batch_size=4, dataset="tiny", data_dir=str(data_dir))
    meta, splits = train_module.load_data(cfg, master=False)
    model = GPT.from_checkpoint(load(trained / "ckpt.pt"))
    probe = {split: train_module.copy_probe_loss(model, splits[split], meta["dtype"], cfg, nullcontext(), "cpu")
             for split in ("val", "train")}
    for file, _ in splits.values():
        file.close()
    assert probe["val"] == pytest.approx(evals[-1]["copy_loss"], rel=1e-5)
    assert abs(probe["train"] - evals[-1]["copy_loss"]) > 1e-3
