"""ablate.py end to end on the CPU: a 2-run x 2-seed ablation of a tiny model, each ablate.py a subprocess."""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from prepare_data import prepare

REPO = Path(__file__).resolve().parent.parent  # the repository root
TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_interval=3, eval_iters=1,
            log_interval=1, warmup_iters=2, lr_decay_iters=6, compile=False, device="cpu", sample_tokens=0,
            log_attn_norm=True)
RUNS = '[softmax]\nattn = "softmax"\n\n[sigmoid]\nattn = "sigmoid"\nqk_norm = true\n'
EXTRA = ["--", "--max_iters=6"]  # given on the command line: the skip check must use it too


def toml_value(v):
    return str(v).lower() if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else str(v)


def write_ablation(tmp, runs=RUNS, name="ablation.toml", **overrides):
    settings = {**TINY, "dataset": "tiny", "data_dir": str(tmp / "data"), **overrides}
    text = (f'base = ["presets/shakespeare_char_cpu.toml"]\nout_root = "{tmp / "out"}"\nseeds = [1, 2]\n\n'
            "[overrides]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items()) + "\n" + runs)
    (tmp / name).write_text(text)
    return tmp / name


def ablate(*args, timeout=120):
    return subprocess.run([sys.executable, "tools/ablate.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One finished ablation: (its folder, its ablation file, the first ablate.py's result)."""
    tmp = tmp_path_factory.mktemp("ablate")
    (tmp / "tiny.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 40)
    prepare(None, data_dir=tmp / "data", input_path=tmp / "tiny.txt", tokenizer="char")
    path = write_ablation(tmp)
    return tmp, path, ablate(path, *EXTRA)


def test_ablation_runs_every_seed_and_writes_the_report(done):
    tmp, _, result = done
    assert result.returncode == 0, result.stderr
    for run in ("softmax", "sigmoid"):
        for seed in (1, 2):
            out_dir = tmp / "out" / run / f"seed{seed}"
            assert (out_dir / "log.jsonl").is_file() and (out_dir / "ckpt.pt").is_file()
            assert (out_dir / "train.out").read_text().startswith(f"$ python train.py ")
            assert f"--out_dir={out_dir} --seed={seed}" in result.stdout  # the command, printed to rerun it
    table = (tmp / "out" / "results.md").read_text()
    for run in ("softmax", "sigmoid"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {run} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == "1, 2" and cells[2] == "6"  # seeds, last eval iter
        evals = [[r for r in map(json.loads, (tmp / "out" / run / f"seed{seed}" / "log.jsonl").read_text().splitlines())
                  if "val_loss" in r] for seed in (1, 2)]
        at_best = [min(e, key=lambda r: r["val_loss"]) for e in evals]
        assert cells[3].split()[0] == f"{sum(r['val_loss'] for r in at_best) / 2:.4f}"  # best val loss, mean of seeds
        assert cells[4].split()[0] == f"{sum(r['train_loss'] for r in at_best) / 2:.4f}"  # train loss at that eval
        assert cells[5].split()[0] == f"{sum(e[-1]['val_loss'] for e in evals) / 2:.4f}"  # final val loss
        assert float(cells[6].split()[0]) > 0 and ".." in cells[6]  # the copy probe at the best eval, per seed
        assert ".." in cells[3] and "--max_iters=6" in cells[9]  # (min..max) spread; the command
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed: val_loss.png is not made")
    assert (tmp / "out" / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_runs_and_resumes_unfinished_ones(done):
    tmp, path, _ = done
    cut = tmp / "out" / "softmax" / "seed2" / "log.jsonl"  # as if killed before its last eval, after a checkpoint
    cut.write_text("".join(cut.read_text().splitlines(keepends=True)[:-1]))
    logs = {p: p.stat().st_mtime_ns for p in (tmp / "out").glob("*/seed*/log.jsonl") if p != cut}
    result = ablate(path, *EXTRA)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("# finished, skipped: python train.py") == 3
    assert f"--out_dir={cut.parent} --seed=2 --init_from=resume" in result.stdout
    assert '"iter": 6, "train_loss"' in cut.read_text().splitlines()[-1]
    assert len(logs) == 3 and all(p.stat().st_mtime_ns == t for p, t in logs.items())


def test_report_only_rebuilds_the_report_from_earlier_logs(done):
    tmp, path, _ = done
    (tmp / "out" / "results.md").unlink()
    result = ablate(path, "--report_only", "--only=sigmoid", *EXTRA)  # the report still covers every run
    assert result.returncode == 0, result.stderr
    table = (tmp / "out" / "results.md").read_text()
    assert "| sigmoid | 1, 2 | 6 |" in table and "| softmax | 1, 2 | 6 |" in table
    assert "python train.py" not in result.stdout.replace("`", "")  # nothing ran


def test_misspelt_key_is_refused_up_front_naming_the_run(tmp_path):
    path = write_ablation(tmp_path, runs=RUNS + '\n[sigmoid_b0]\nattn = "sigmoid"\nqk_nrom = true\n')
    result = ablate(path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: run 'sigmoid_b0': unknown config key 'qk_nrom'; did you mean 'qk_norm'?"]
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.parametrize("args, message", [
    (["--only=softmx"], "did you mean 'softmax'?"),
    (["--seeds=1,x"], "--seeds expects comma-separated integers"),
    (["--", "--learnig_rate=1"], "did you mean 'learning_rate'?"),
    (["--mps=yes"], "--mps: invalid choice: 'yes'"),
    (["--max_iters=3"], "unrecognized arguments: --max_iters=3; give train.py overrides after -- (see python tools/"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    result = ablate(write_ablation(tmp_path), *args)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_failing_run_is_reported_and_the_others_continue(done, tmp_path):
    tmp, _, _ = done
    runs = '[no_checkpoint]\ninit_from = "resume"\n\n[softmax]\nattn = "softmax"\n'  # the first fails in train.py
    path = write_ablation(tmp_path, runs=runs, data_dir=str(tmp / "data"), max_iters=3)
    result = ablate(path, "--seeds=1")
    assert result.returncode == 1
    assert "FAILED no_checkpoint seed 1" in result.stderr and "1 of 2 runs failed" in result.stderr
    assert "| softmax | 1 | 3 |" in (tmp_path / "out" / "results.md").read_text()


def test_missing_dataset_is_one_line_before_any_run(tmp_path):
    runs = RUNS + '\n[other_data]\ndataset = "elsewhere"\n'  # 3 runs x 2 seeds on 2 missing datasets
    path = write_ablation(tmp_path, runs=runs, dataset="nowhere")
    result = ablate(path)
    assert result.returncode == 2 and not (tmp_path / "out").exists()  # nothing ran
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'data' / name / 'meta.json'} not found: run python prepare_data.py --input=PATH "
        f"--name={name} --data_dir={tmp_path / 'data'}" for name in ("nowhere", "elsewhere")]
    result = ablate(path, "--dry_run")  # says so too, and still prints the commands
    assert result.returncode == 0 and result.stderr.count("note: ") == 2 and result.stdout.count("train.py") == 6


@pytest.mark.parametrize("name, n_runs", [("sigmoid_recipe.toml", 11), ("long_context.toml", 15),
                                          ("long_context_4096.toml", 9), ("hybrid_bias.toml", 9)])
def test_shipped_ablation_files_validate(name, n_runs):
    result = ablate(f"ablations/{name}", "--dry_run")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if "python train.py" in line]
    assert len(commands) == n_runs * 2  # every run x 2 seeds, each config loaded and checked


def test_forced_run_removes_the_old_checkpoint_first(done, tmp_path):
    """Else a forced run that stops early would leave the old ckpt.pt, and the next rerun resume from it."""
    tmp, _, _ = done
    path = write_ablation(tmp_path, data_dir=str(tmp / "data"), max_iters=0)  # iter 0 writes no checkpoint
    old = tmp_path / "out" / "softmax" / "seed1"
    old.mkdir(parents=True)
    (old / "ckpt.pt").write_bytes(b"an older run's checkpoint")
    (old / "log.jsonl").write_text('{"iter": 0}\n')
    result = ablate(path, "--force", "--only=softmax", "--seeds=1")
    assert result.returncode == 0, result.stderr
    assert not (old / "ckpt.pt").exists()


def test_each_run_says_when_it_starts_and_finishes_first_seeds_first(done):
    _, _, result = done
    started = re.findall(r"\] start python train.py .*--out_dir=\S+/(\w+)/seed(\d)", result.stdout)
    assert started == [("softmax", "1"), ("sigmoid", "1"), ("softmax", "2"), ("sigmoid", "2")]
    finished = re.findall(r"\] done (\w+) seed (\d): best val loss (\d+\.\d{4}), \d+\.\d min", result.stdout)
    assert sorted((run, seed) for run, seed, _ in finished) == sorted(started)
    assert re.search(r"4 runs finished in \d+\.\d min, 1 at a time: \d+\.\d runs per hour", result.stdout)


@pytest.fixture
def ablate_module(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import ablate
    return ablate


def test_runs_share_each_gpu_per_gpu_times_and_the_cpu_one_at_a_time(ablate_module, monkeypatch):
    ablate = ablate_module
    assert ablate.pick_slots("0,1", 3) == ["0", "0", "0", "1", "1", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU
    assert ablate.pick_slots("auto", 4) == [None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert ablate.pick_slots("auto", 2) == ["2", "2", "5", "5"]
    # no --per_gpu: 8 per GPU, fewer where all runs at once would outnumber half the cores
    assert ablate.pick_slots("0", cores=16) == ["0"] * 8
    assert ablate.pick_slots("0", cores=128) == ["0"] * 8
    assert ablate.pick_slots("0,1", cores=16) == ["0"] * 4 + ["1"] * 4
    assert ablate.pick_slots("0", cores=2) == ["0"]


def test_per_gpu_below_one_is_one_line(tmp_path):
    result = ablate(write_ablation(tmp_path), "--per_gpu=0")
    assert result.returncode == 2 and result.stderr.strip() == "error: --per_gpu must be at least 1, got 0"


# ----------------------------------------------------------------------------- CUDA MPS (a fake daemon)

@pytest.fixture
def mps(ablate_module, tmp_path, monkeypatch):
    """ablate.py with a fake nvidia-cuda-mps-control on PATH, a probe that needs no GPU, and the log of
    what both were asked: (the module, the log, a function that makes `-d` fail with a message)."""
    ablate = ablate_module
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    fake = bin_dir / ablate.MPS_CONTROL
    fake.write_text(f"""#!/bin/sh
if [ "$1" = "-d" ]; then
  echo "start $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY GPUs $CUDA_VISIBLE_DEVICES" >> {calls}
  if [ -f {tmp_path}/fail ]; then cat {tmp_path}/fail >&2; exit 1; fi
else
  echo "$(cat) $CUDA_MPS_PIPE_DIRECTORY" >> {calls}
fi
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    probe = tmp_path / "probe.py"
    probe.write_text(f"import os, sys\nwith open({str(calls)!r}, 'a') as f:\n"
                     "    env = os.environ\n"
                     "    f.write(f\"probe {env['CUDA_MPS_PIPE_DIRECTORY']} GPUs {env['CUDA_VISIBLE_DEVICES']} of {sys.argv[1]}\\n\")\n")
    monkeypatch.setattr(ablate, "MPS_PROBE", [sys.executable, str(probe)])
    return ablate, calls, lambda message: (tmp_path / "fail").write_text(message)


def script_job(ablate, out_dir, script):
    """A Job whose train.py is this Python script instead."""
    job = ablate.Job.__new__(ablate.Job)
    job.run, job.seed, job.max_iters, job.out_dir, job.resuming, job.shown = out_dir.name, 1, 10, out_dir, False, "run"
    job.argv = [sys.executable, "-c", script]
    return job


# as train.py: Ctrl-C and a kill stop it with a last word and exit 130
ON_STOP = ("import signal, sys, time\nstop = lambda *_: (print({!r}, flush=True), sys.exit(130))\n"
           "signal.signal(signal.SIGINT, stop)\nsignal.signal(signal.SIGTERM, stop)\n")


def child_env(ablate, tmp_path, env):
    """What a run's train.py finds in its environment, started by Job.train with env."""
    job = script_job(ablate, tmp_path / "run", "import os; print(os.environ.get('CUDA_MPS_PIPE_DIRECTORY'), "
                     "os.environ.get('CUDA_VISIBLE_DEVICES'))")
    assert job.train(echo=False, threads=None, gpu_env=env) == 0
    return (tmp_path / "run" / "train.out").read_text().splitlines()[-1]


def test_runs_sharing_a_gpu_get_an_mps_daemon_of_their_own_quit_at_the_end(mps, tmp_path, capsys):
    ablate, calls, _ = mps
    with ablate.shared_gpus("auto", ["2", "2", "5", "5"]) as env_for:
        folder = env_for("2")["CUDA_MPS_PIPE_DIRECTORY"]
        assert Path(folder).is_dir() and env_for("2")["CUDA_MPS_LOG_DIRECTORY"] == folder
        # the daemon sees GPUs 2 and 5 only, renumbered 0 and 1 for its clients (as MPS requires)
        assert calls.read_text().splitlines() == [f"start {folder} {folder} GPUs 2,5", f"probe {folder} GPUs 0,1 of 2"]
        assert child_env(ablate, tmp_path, env_for("5")) == f"{folder} 1"
    assert calls.read_text().splitlines()[-1] == f"quit {folder}" and not Path(folder).exists()
    assert f"CUDA MPS: runs on one GPU run their kernels side by side (should ablate.py die, stop the daemon with: " \
           f"echo quit | CUDA_MPS_PIPE_DIRECTORY={folder} {ablate.MPS_CONTROL})" in capsys.readouterr().out


def test_the_daemon_is_quit_when_the_runs_raise(mps):
    ablate, calls, _ = mps
    with pytest.raises(KeyboardInterrupt), ablate.shared_gpus("auto", ["0", "0"]) as env_for:
        folder = env_for("0")["CUDA_MPS_PIPE_DIRECTORY"]
        raise KeyboardInterrupt
    assert calls.read_text().splitlines()[-1] == f"quit {folder}" and not Path(folder).exists()


def test_main_gives_each_run_the_daemon_and_its_gpu_and_skips_it_for_one_run(mps, tmp_path, monkeypatch, capsys):
    ablate, calls, _ = mps
    (tmp_path / "tiny.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 40)
    prepare(None, data_dir=tmp_path / "data", input_path=tmp_path / "tiny.txt", tokenizer="char")
    seen = []
    monkeypatch.setattr(ablate, "pick_slots", lambda spec, per_gpu: ["0", "0"])
    monkeypatch.setattr(ablate.Job, "train", lambda job, echo, threads, gpu_env, stop: seen.append(gpu_env) or 0)
    path = write_ablation(tmp_path)
    assert ablate.main([str(path), "--seeds=1"]) == 0
    folder = seen[0]["CUDA_MPS_PIPE_DIRECTORY"]
    assert seen == [{"CUDA_MPS_PIPE_DIRECTORY": folder, "CUDA_MPS_LOG_DIRECTORY": folder, "CUDA_VISIBLE_DEVICES": "0"}] * 2
    assert calls.read_text().splitlines()[-1] == f"quit {folder}"
    calls.unlink()
    seen.clear()
    assert ablate.main([str(path), "--seeds=1", "--only=softmax"]) == 0  # one run: nothing to share
    assert seen == [{"CUDA_VISIBLE_DEVICES": "0"}] and not calls.exists()


@pytest.mark.parametrize("slots", [["0"], ["0", "1"], [None]])
def test_no_daemon_where_no_two_runs_share_a_gpu(mps, slots, tmp_path, capsys):
    ablate, calls, _ = mps
    with ablate.shared_gpus("auto", slots) as env_for:
        assert child_env(ablate, tmp_path, env_for(slots[-1])) == f"None {slots[-1]}"
    assert not calls.exists() and capsys.readouterr() == ("", "")
    with pytest.raises(SystemExit) as e, ablate.shared_gpus("true", slots):
        pass
    assert e.value.code == 2 and "--mps=true" in capsys.readouterr().err


def test_a_daemon_that_cannot_start_or_serve_leaves_runs_taking_turns(mps, tmp_path, capsys, monkeypatch):
    ablate, calls, make_fail = mps
    make_fail("An instance of this daemon is already running\n")
    with ablate.shared_gpus("auto", ["3", "3"]) as env_for:
        assert env_for("3") == {"CUDA_VISIBLE_DEVICES": "3"}
    assert capsys.readouterr().err == ("note: CUDA MPS did not start: An instance of this daemon is already running, "
                                       "so runs sharing a GPU take turns (--mps=false skips trying)\n")
    with pytest.raises(SystemExit) as e, ablate.shared_gpus("true", ["0", "0"]):
        pass
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "error: --mps=true: CUDA MPS did not start: An instance of this daemon is already running; run with --mps=false"]
    # started, but a CUDA process fails through it: the daemon is quit again
    (tmp_path / "fail").unlink()
    calls.unlink()
    monkeypatch.setattr(ablate, "MPS_PROBE", [sys.executable, "-c", "raise SystemExit('RuntimeError: no CUDA GPUs')"])
    with ablate.shared_gpus("auto", ["0", "0"]) as env_for:
        assert env_for("0") == {"CUDA_VISIBLE_DEVICES": "0"}
    started, quit_ = calls.read_text().splitlines()
    assert started.startswith("start ") and quit_ == f"quit {started.split()[1]}"
    assert "a CUDA process could not run through it: RuntimeError: no CUDA GPUs, so" in capsys.readouterr().err
    # not installed
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with ablate.shared_gpus("auto", ["0", "0"]) as env_for:
        assert env_for("0") == {"CUDA_VISIBLE_DEVICES": "0"}
    assert f"note: CUDA MPS is not installed (no {ablate.MPS_CONTROL} on PATH), so" in capsys.readouterr().err


def test_runs_side_by_side_print_a_progress_line_on_all_of_them(ablate_module, tmp_path, monkeypatch, capsys):
    """Each line: steps trained of all, runs running/waiting/done, and the time left at that pace."""
    ablate = ablate_module

    class FakeJob(ablate.Job):
        def __init__(self, name, max_iters, steps, resumed_at=None):
            self.run, self.seed, self.max_iters, self.steps = name, 1, max_iters, steps
            self.out_dir, self.shown = tmp_path / name, f"train {name}"
            self.resuming = resumed_at is not None
            self.out_dir.mkdir()
            if self.resuming:
                (self.out_dir / "log.jsonl").write_text(json.dumps({"iter": resumed_at, "val_loss": 2.0}) + "\n")

        def train(self, echo, threads, gpu_env, stop):
            with open(self.out_dir / "train.out", "w") as out:
                for it in self.steps:
                    out.write(f"iter {it}/{self.max_iters} (50%): loss 2.0\n")
                    out.flush()
                    time.sleep(0.15)
            return 0

    monkeypatch.setattr(ablate, "STATUS_EVERY", 0.25)
    jobs = [FakeJob("a", 100, [0, 10, 20, 30, 40]), FakeJob("b", 100, [50, 60, 70, 80, 90], resumed_at=50),
            FakeJob("c", 100, [0, 50])]
    failed, stopped = ablate.run_all(jobs, ["0", "0"])
    assert not failed and not stopped
    lines = re.findall(r"^\[\d+\.\d min\] .*$", capsys.readouterr().out, re.M)
    assert lines, "no progress line"
    pattern = (r"\[\d\.\d min\] ([\d,]+) of 300 steps \((\d+)%\), (\d) running, (\d) waiting, (\d) done"
               r"(; ~\d+\.\d min left at this pace)?")
    for line in lines:
        done, percent, running, waiting, finished, pace = re.fullmatch(pattern, line).groups()
        assert int(running) + int(waiting) + int(finished) == 3 and int(running) <= 2
        assert int(done) >= 50 and int(percent) == int(done) * 100 // 300  # b's 50 steps before it resumed count
    # while a and b run and c waits: a's and b's latest steps, c nothing yet
    assert re.fullmatch(pattern, lines[0]).groups()[2:5] == ("2", "1", "0")
    assert any(re.fullmatch(pattern, line).group(6) for line in lines)
    # the first line has no pace: its minute went mostly to compiling
    states = {jobs[0]: "done", jobs[1]: "failed", jobs[2]: "waiting"}
    assert ablate.progress_line(states, {j: 0 for j in jobs}, 60) \
        == ("[1.0 min] 191 of 300 steps (63%), 0 running, 1 waiting, 1 done, 1 failed", (141, 60))
    # the pace of the last line's interval: 100 steps in 30 s, 109 left
    assert ablate.progress_line(states, {j: 0 for j in jobs}, 60, last=(41, 30))[0] \
        == "[1.0 min] 191 of 300 steps (63%), 0 running, 1 waiting, 1 done, 1 failed; ~0.5 min left at this pace"
    # b resumed at step 50 and has not logged a step yet (its train.out starts afresh): 50 done, none at this pace
    (tmp_path / "b" / "train.out").write_text("compiling\n")
    assert ablate.progress_line({jobs[0]: "running", jobs[1]: "running", jobs[2]: "waiting"},
                                {jobs[0]: 0, jobs[1]: 50, jobs[2]: 0}, 120, last=(11, 60)) \
        == ("[2.0 min] 91 of 300 steps (30%), 2 running, 1 waiting, 0 done; ~7.0 min left at this pace", (41, 120))
    # no step since the last line: no pace
    assert ablate.progress_line({jobs[0]: "running", jobs[1]: "running", jobs[2]: "waiting"},
                                {jobs[0]: 0, jobs[1]: 50, jobs[2]: 0}, 180, last=(41, 120))[0] \
        == "[3.0 min] 91 of 300 steps (30%), 2 running, 1 waiting, 0 done"


def test_a_kill_stops_the_runs_as_ctrl_c_does(ablate_module, tmp_path):
    """SIGTERM to ablate.py alone (a scheduler, `timeout`) reaches each running train.py as Ctrl-C, so
    each saves and exits, and ablate.py returns instead of leaving them (and an MPS daemon) behind."""
    ablate = ablate_module
    job = script_job(ablate, tmp_path / "r", ON_STOP.format("saved on Ctrl-C") + "print('ready', flush=True)\ntime.sleep(40)")
    killer = threading.Thread(target=lambda: (wait_for(lambda: "ready" in read(job.out_dir / "train.out")),
                                              os.kill(os.getpid(), signal.SIGTERM)))
    killer.start()
    began = time.monotonic()
    failed, stopped = ablate.run_all([job], [None, None])
    killer.join()
    assert stopped and failed == [job] and time.monotonic() - began < 30
    assert read(job.out_dir / "train.out").splitlines()[-1] == "saved on Ctrl-C"


def read(path):
    return path.read_text() if path.exists() else ""


def wait_for(condition, timeout=30):
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        time.sleep(0.05)


def test_a_run_started_as_the_kill_came_is_stopped_at_once(ablate_module, tmp_path):
    """A kill that came as a run started: stopped at once, even with SIGINT ignored, as a script's
    background job inherits it (train.py installs its handler only after its imports, here 0.3 s)."""
    ablate = ablate_module
    job = script_job(ablate, tmp_path / "r", "import time\ntime.sleep(0.3)\n" + ON_STOP.format("stopped")
                     + "time.sleep(40)")
    stop = threading.Event()
    stop.set()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run inherits it
    try:
        began = time.monotonic()
        code = job.train(echo=False, threads=None, gpu_env={}, stop=stop)
    finally:
        signal.signal(signal.SIGINT, previous)
    # a SIGINT would have been ignored and the run slept its 40 s; SIGTERM ends it before its handler
    assert code == -signal.SIGTERM and time.monotonic() - began < 30


def test_a_signal_it_was_told_to_ignore_does_not_stop_it(ablate_module, monkeypatch):
    """nohup ignores SIGHUP: a closed terminal must not stop the runs."""
    ablate = ablate_module
    assert signal.SIGTERM in ablate.stop_signals()
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN if sig == signal.SIGHUP else signal.SIG_DFL)
    assert signal.SIGHUP not in ablate.stop_signals() and signal.SIGTERM in ablate.stop_signals()


def test_a_second_kill_while_the_first_is_handled_does_not_hang_it(tmp_path):
    """`timeout` sends its SIGTERM to ablate.py and then to the whole process group, so a second one can
    land while the handler of the first holds the stop event's lock: ablate.py once waited on that lock
    forever after its runs had stopped. Here the second kill lands inside the event's set()."""
    script = textwrap.dedent(f"""
        import os, signal, sys, threading, time, types
        from pathlib import Path
        sys.path[:0] = [{str(REPO / 'tools')!r}, {str(REPO / 'tests')!r}]
        import ablate
        from test_ablate import ON_STOP, script_job

        class SecondKillInsideSet(threading.Event):
            def set(self):
                with self._cond:  # as Event.set: the flag under the condition's lock
                    if not getattr(self, "killed", False):
                        self.killed = True
                        os.kill(os.getpid(), signal.SIGTERM)
                        time.sleep(0.2)  # the second handler runs here, in this thread
                    self._flag = True
                    self._cond.notify_all()

        ablate.threading = types.SimpleNamespace(**vars(threading))  # ablate's stop event only, not Thread's
        ablate.threading.Event = SecondKillInsideSet
        job = script_job(ablate, Path({str(tmp_path / 'r')!r}),
                         ON_STOP.format("stopped") + "print('ready', flush=True)\\ntime.sleep(40)")
        def kill():  # once the run is up: the first kill
            out = job.out_dir / "train.out"
            while not (out.exists() and "ready" in out.read_text()):
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=kill, daemon=True).start()
        failed, stopped = ablate.run_all([job], [None, None])
        print("returned", stopped, failed == [job])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "returned True True", result.stderr
