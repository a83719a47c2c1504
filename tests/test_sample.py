"""sample.py on a tiny checkpoint made here, in train.py's checkpoint format."""
import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
from configurable import TrainConfig, config_to_dict
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent  # the repository root

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def write_checkpoint(out_dir, **model_kw):
    """A train.py-style checkpoint of an untrained char model."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=32, bias=False, **model_kw)
    model = GPT(config)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    meta = {"format": 1, "name": "tiny", "tokenizer": "char", "vocab_size": len(CHARS), "dtype": "uint16",
            "train_tokens": 1000, "val_tokens": 100, "source": "test", "source_sha256": "0" * 64, "chars": CHARS}
    ckpt = {"model": model.state_dict(), "model_args": dataclasses.asdict(config), "config": config_to_dict(TrainConfig()),
            "dataset_meta": meta, "iter_num": 0, "best_val_loss": 1e9, "optimizer": optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
    out_dir.mkdir(exist_ok=True)
    torch.save(ckpt, out_dir / "ckpt.pt")


@pytest.mark.parametrize("attn", ["softmax", "sigmoid"])
def test_sample_prints_text(tmp_path, capsys, attn):
    write_checkpoint(tmp_path, attn=attn, pos_emb="rope")
    sample.main([f"--out_dir={tmp_path}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=30", "--top_p=0.9"])
    samples = capsys.readouterr().out.split("---------------\n")
    assert len(samples) == 3 and samples[2] == ""
    for text in samples[:2]:
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30 + 1  # + print's newline
        assert set(text) <= set(CHARS)


def test_sample_script_runs_from_the_command_line(tmp_path):
    write_checkpoint(tmp_path, attn="sigmoid", sigmoid_bias="learnable", pos_emb="alibi")
    (tmp_path / "prompt.txt").write_text("To be")
    result = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--out_dir={tmp_path}", f"--start=FILE:{tmp_path / 'prompt.txt'}",
                             "--num_samples=1", "--max_new_tokens=10", "--temperature=0"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("To be") and "---------------" in result.stdout


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    return e.value.code, capsys.readouterr().err


def test_missing_checkpoint_is_one_line_exit_1(tmp_path, capsys):
    code, err = run_main([f"--out_dir={tmp_path / 'out'}"], capsys)
    assert code == 1
    assert err == (f"error: no checkpoint at {tmp_path / 'out' / 'ckpt.pt'}: "
                   f"train first with python train.py --out_dir={tmp_path / 'out'}\n")


def test_without_out_dir_the_newest_run_here_is_sampled(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_main([], capsys)
    assert code == 1 and err == (f"error: no run folder with a checkpoint in {tmp_path}: "
                                 "train first with python train.py, or give --out_dir\n")
    write_checkpoint(tmp_path / "out-a-sigmoid", attn="sigmoid")
    write_checkpoint(tmp_path / "out-a-softmax")
    os.utime(tmp_path / "out-a-sigmoid" / "ckpt.pt", (1e9, 1e9))  # older than the softmax run
    sample.main(["--num_samples=1", "--max_new_tokens=3"])
    err = capsys.readouterr().err
    assert err == ("sampling from out-a-softmax/ckpt.pt, the newest run here (--out_dir picks one; "
                   "the others: out-a-sigmoid)\n")


def test_best_pt_is_preferred_and_named(tmp_path, capsys):
    write_checkpoint(tmp_path)
    (tmp_path / "ckpt.pt").rename(tmp_path / "best.pt")
    (tmp_path / "ckpt.pt").write_text("not a checkpoint")  # so that reading it would fail
    sample.main([f"--out_dir={tmp_path}", "--num_samples=1", "--max_new_tokens=3"])
    err = capsys.readouterr().err
    assert err == f"sampling from {tmp_path / 'best.pt'} (the lowest val loss; --checkpoint=latest reads ckpt.pt)\n"
    code, err = run_main([f"--out_dir={tmp_path}", "--checkpoint=latest"], capsys)
    assert code == 1 and str(tmp_path / "ckpt.pt") in err


@pytest.mark.parametrize("arg, message", [
    ("--top_k=-1", "--top_k must be 0 or more"),
    ("--temperature=-0.5", "--temperature must be 0 or more"),
    ("--top_p=0", "--top_p must be more than 0 and at most 1"),
    ("--top_p=1.5", "--top_p must be more than 0 and at most 1"),
    ("--num_samples=0", "--num_samples must be at least 1"),
    ("--max_new_tokens=0", "--max_new_tokens must be at least 1"),
    ("--device=gpu", "--device expects auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    pytest.param("--device=cuda", "--device=cuda but", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                                 reason="this machine has a GPU")),
])
def test_bad_setting_is_one_line_exit_2_before_the_checkpoint_is_read(tmp_path, capsys, arg, message):
    write_checkpoint(tmp_path)
    code, err = run_main([f"--out_dir={tmp_path}", "--max_new_tokens=2", "--num_samples=1", arg], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {message}"), err


def test_prompt_outside_the_vocabulary_is_one_line(tmp_path, capsys):
    write_checkpoint(tmp_path)
    code, err = run_main([f"--out_dir={tmp_path}", "--start=héllo"], capsys)
    assert code == 1 and err.count("\n") == 1 and "'é'" in err and err.startswith("error: ")


def test_checkpoint_of_another_architecture_is_one_line(tmp_path, capsys):
    write_checkpoint(tmp_path)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del ckpt["model_args"]["qk_norm"]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    code, err = run_main([f"--out_dir={tmp_path}"], capsys)
    assert code == 1 and err.count("\n") == 1 and "another model version" in err


@pytest.mark.parametrize("content, message", [
    (b"just some text\n", "is not a torch checkpoint: point at a checkpoint written by train.py"),
    (b"", "is empty: point at a checkpoint written by train.py"),
    ("half", "it is cut short or corrupt (no zip directory at its end): is it a complete checkpoint written "
             "by train.py?"),
])
def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path, capsys, content, message):
    write_checkpoint(tmp_path)
    if content == "half":
        whole = (tmp_path / "ckpt.pt").read_bytes()
        content = whole[:len(whole) // 2]  # a copy cut short
    (tmp_path / "ckpt.pt").write_bytes(content)
    code, err = run_main([f"--out_dir={tmp_path}"], capsys)
    assert code == 1 and err.count("\n") == 1 and message in err and "could run code" not in err, err


class RunsCode:
    """Unpickling this would call os.system: a checkpoint must never be able to do that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"model": RunsCode(marker)}, tmp_path / "ckpt.pt")
    code, err = run_main([f"--out_dir={tmp_path}"], capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert not marker.exists()
