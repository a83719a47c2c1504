"""
Run an ablation: every (run, seed) of an ablation file through train.py, then a table and a plot.

    python tools/ablate.py ablations/sigmoid_recipe.toml                  # all runs x seeds, 8 at a time per GPU
    python tools/ablate.py ablations/sigmoid_recipe.toml --gpus=0,1 --per_gpu=4   # 4 at a time on each of GPUs 0 and 1
    python tools/ablate.py ablations/sigmoid_recipe.toml --only=softmax,sigmoid_recipe --seeds=1337
    python tools/ablate.py ablations/sigmoid_recipe.toml --dry_run        # check every run's config, print the commands
    python tools/ablate.py ablations/sigmoid_recipe.toml --report_only    # results.md + val_loss.png from earlier logs
    python tools/ablate.py ablations/sigmoid_recipe.toml -- --max_iters=1000   # train.py overrides for every run

An ablation file is TOML: base = ["presets/x.toml"], out_root = "out-x", optional seeds = [...] and
overrides = {key = value} for every run, then one [table] of train.py keys per run. Each (run, seed)
trains in <out_root>/<run>/seed<seed>/ (log.jsonl, ckpt.pt, train.out); one whose log.jsonl already
ends with the eval at max_iters is skipped, and an unfinished one with a ckpt.pt resumes from it,
unless --force (start every run afresh). Small runs do not fill a GPU, so --per_gpu runs share each
GPU, through a CUDA MPS daemon of ablate.py's own where MPS is installed (--mps): without it the
processes on one GPU take turns, with it their kernels run side by side. On an H200 with 16 CPU
cores, 8 baby GPTs of 1000 steps each finished in 99.5 s taking turns, in 73.5 s through MPS; through
MPS, 16 such runs in 2.2 min 8 at a time and in 2.0 min 16 at a time (results/training_speed.md).
Hence 8 per GPU by default, fewer where all runs at once would outnumber half the CPU cores; on the
CPU one runs at a time. Each run prints a line when it starts and ends; with several at once, a line
every minute sums them up (steps trained of all, runs running, waiting and done, and from the
second line on, the time left at the last minute's pace). Ctrl-C, a kill or a closed terminal
stops every run as Ctrl-C stops train.py; the same command then resumes. The end says how many
runs finished per hour: run the same ablation with --force and another --per_gpu to find the best
packing for another machine.
"""
import argparse
import contextlib
import difflib
import json
import math
import os
import queue
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root: train.py, presets/
sys.path.insert(0, str(ROOT))
from configurable import ConfigError, load_config  # noqa: E402
from prepare_data import DataError, OneLineParser, check_bin, load_meta, prepare  # noqa: E402

TOP_KEYS = ("base", "out_root", "seeds", "overrides")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def as_args(table, where):
    """{key: TOML value} -> ['--key=value', ...]: the text train.py's command line takes."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table of key = value")
    for key, value in table.items():
        if key in ("out_dir", "seed"):
            raise ConfigError(f"{where}: remove {key}; ablate.py sets out_dir and seed for each (run, seed)")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: {key} must be a single value, got {value!r}")
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in table.items()]


def load_ablation(path, extra):
    """The ablation file -> (out_root, seeds, {run: train.py args}). Every run's whole config is checked
    here, as train.py will check it, so a typo stops everything before the first run. Raises ConfigError."""
    from attention import check_attention_config  # train.py's cross-key checks (imports torch)
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read ablation file {path!r}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {' '.join(str(e).split())}") from None
    base, out_root, seeds = spec.get("base"), spec.get("out_root"), spec.get("seeds", [1337])
    if not isinstance(base, list) or not base or not all(isinstance(p, str) and p.endswith(".toml") for p in base):
        # with no preset train.py picks one per machine (GPU or CPU): runs would differ by where they ran
        raise ConfigError(f'{path}: set base = ["presets/x.toml"], the presets every run starts from')
    base = [os.path.relpath(ROOT / p) if not Path(p).exists() and (ROOT / p).exists() else p for p in base]
    if not isinstance(out_root, str) or not out_root:
        raise ConfigError(f'{path}: set out_root = "out-name", the folder that gets one subfolder per run')
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        raise ConfigError(f"{path}: seeds must be a list of ints, e.g. seeds = [1337, 1338]")
    shared = base + as_args(spec.get("overrides", {}), f"{path}: overrides")
    try:
        load_config(shared + extra)
    except ConfigError as e:
        raise ConfigError(f"{path} (base, overrides) or after --: {e}") from None
    runs = {}
    for name, table in spec.items():
        if name in TOP_KEYS:
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown top-level key {name!r}; the top level holds only "
                              f"{', '.join(TOP_KEYS)}, and each run is a [table]")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"{path}: run [{name}] needs a folder-safe name: letters, digits, _ . -")
        runs[name] = shared + as_args(table, f"run {name!r}") + extra  # later keys win: extra over run over shared
        try:
            check_attention_config(load_config(runs[name]))
        except ConfigError as e:
            raise ConfigError(f"run {name!r}: {e}") from None
    if not runs:
        raise ConfigError(f'{path}: no runs; add one table per run, e.g. [softmax] with attn = "softmax"')
    return out_root, seeds, runs


def check_data(jobs, runs, dry_run):
    """The dataset of every run about to train, checked once before the first starts, as train.py checks it.
    Returns one line per broken dataset, naming the prepare_data.py command, rather than a failure per run."""
    configs = [load_config(runs[run]) for run in dict.fromkeys(job.run for job in jobs)]
    problems = []
    for folder in dict.fromkeys(Path(cfg.data_dir) / cfg.dataset for cfg in configs):
        try:
            if folder.name == "shakespeare_char" and not (folder / "meta.json").exists():
                if dry_run:  # train.py builds it
                    continue
                prepare("shakespeare_char", folder.parent)  # as train.py would, once, not by parallel runs at once
            meta = load_meta(folder)
            check_bin(folder, meta, "train"), check_bin(folder, meta, "val")
        except DataError as e:
            problems.append(str(e))
    return problems


class Job:
    def __init__(self, run, seed, out_root, args):
        self.run, self.seed, self.out_dir = run, seed, Path(out_root) / run / f"seed{seed}"
        args = args + [f"--out_dir={self.out_dir}", f"--seed={seed}"]
        cfg = load_config(args)
        self.max_iters, self.resuming = cfg.max_iters, cfg.init_from == "resume"
        self.argv = [sys.executable, str(ROOT / "train.py"), *args]
        self.shown = shlex.join(["python", os.path.relpath(ROOT / "train.py"), *args])  # what a user can paste

    def log(self):
        path = self.out_dir / "log.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [json.loads(line) for line in lines if line.endswith("}")]  # a killed run's last line may be cut short

    def resume(self):  # an unfinished run with a checkpoint goes on from it (train.py resumes exactly)
        self.resuming = True
        self.argv.append("--init_from=resume")
        self.shown += " --init_from=resume"

    def finished(self):  # train.py evaluates at max_iters and logs that as its last line
        log = self.log()
        return bool(log) and log[-1].get("iter") == self.max_iters and log[-1].get("val_loss") is not None

    def steps_logged(self):
        """(the step its train.out began at, the steps done by its last line), or None before its first
        line: "iter N/M: ..." follows step N, counted from 0, and a resumed run begins at its checkpoint."""
        try:
            found = re.findall(r"^iter (\d+)/\d+ ", (self.out_dir / "train.out").read_text(), re.M)
        except OSError:
            return None
        return (int(found[0]), int(found[-1]) + 1) if found else None

    def interrupt(self):
        """A kill for its train.py, which stops on it as on Ctrl-C, naming its last checkpoint to resume
        from. SIGTERM, not SIGINT: a run started by a script's background job inherits SIGINT ignored
        until train.py installs its handler, after its imports, and would lose one sent before; SIGTERM
        ends a run that is still starting, which has nothing to save."""
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    def best_val_loss(self):
        return min((r["val_loss"] for r in self.log() if r.get("val_loss") is not None), default=math.nan)

    def train(self, echo, threads, gpu_env, stop=None):
        """train.py in a subprocess, its output to out_dir/train.out (and to the terminal if echo), with
        `threads` CPU threads for torch and for compiling and gpu_env, which picks its GPU (see
        shared_gpus); interrupted at once if the event `stop` is set by then. Returns its exit status."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.resuming:  # a fresh start (or --force): should it stop, a rerun must not resume the old checkpoint
            for name in ("ckpt.pt", "log.jsonl"):
                (self.out_dir / name).unlink(missing_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **gpu_env)
        if threads:  # runs side by side share the cores instead of each starting one thread per core
            env.update(OMP_NUM_THREADS=str(threads), TORCHINDUCTOR_COMPILE_THREADS=str(threads))
        with open(self.out_dir / "train.out", "w", buffering=1) as out:  # line-buffered: tail -f shows progress
            out.write(f"$ {self.shown}\n")
            self.proc = proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                text=True, env=env)
            if stop is not None and stop.is_set():  # a kill came while it started: run_all's handler missed it
                self.interrupt()
            for line in proc.stdout:
                out.write(line)
                if echo:
                    print(line, end="", flush=True)
            return proc.wait()


STATUS_EVERY = 60  # seconds between progress lines while several runs go at once


def on_gpu(gpu):
    """The environment that puts a run on this GPU (None: wherever train.py puts it)."""
    return {} if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu}


def run_all(jobs, slots, env_for=on_gpu):
    """Jobs, len(slots) at a time, each slot a GPU id or None, env_for(slot) the environment that puts a
    run there. Returns (the failed ones, whether Ctrl-C or a kill stopped it); a failure leaves the
    others to carry on."""
    todo, failed, lock, stop = queue.Queue(), [], threading.Lock(), threading.Event()
    for i, job in enumerate(jobs):
        todo.put((i, job))
    state = {job: "waiting" for job in jobs}
    # a resumed run's steps so far, until it starts (its log may run past its checkpoint: a guess)
    before = {job: job.log()[-1].get("iter", 0) if job.resuming and job.log() else 0 for job in jobs}
    threads = max(1, (os.cpu_count() or 1) // len(slots)) if len(slots) > 1 else None
    start = time.monotonic()

    def worker(gpu):
        while not stop.is_set():
            try:
                i, job = todo.get_nowait()
            except queue.Empty:  # another worker took the last one
                return
            with lock:
                if stop.is_set():  # a kill came after this worker looked
                    return
                state[job] = "running"
                print(f"[{i + 1}/{len(jobs)}] start{'' if gpu is None else f' (GPU {gpu})'} {job.shown}", flush=True)
            began = time.monotonic()
            code = job.train(echo=len(slots) == 1, threads=threads, gpu_env=env_for(gpu), stop=stop)
            took = f"{(time.monotonic() - began) / 60:.1f} min"
            with lock:
                state[job] = "failed" if code else "done"
                if code:
                    last = ((job.out_dir / "train.out").read_text().strip().splitlines() or [""])[-1]
                    failed.append(job)
                    print(f"[{i + 1}/{len(jobs)}] {'STOPPED' if stop.is_set() else 'FAILED'} {job.run} seed {job.seed} "
                          f"(exit {code}) after {took}: {last} [see {job.out_dir / 'train.out'}]",
                          file=sys.stderr, flush=True)
                else:
                    print(f"[{i + 1}/{len(jobs)}] done {job.run} seed {job.seed}: best val loss "
                          f"{job.best_val_loss():.4f}, {took}", flush=True)

    handling = []  # non-empty while the handler runs: a second signal (`timeout` signals ablate.py, then its
    # process group) can land inside the first one's stop.set(), whose lock it would wait on forever

    def interrupt(signum, frame):  # start no more runs; the running ones stop, their checkpoints kept
        if handling:
            return
        handling.append(signum)
        try:
            stop.set()
            if signum != signal.SIGINT:  # Ctrl-C reaches them itself (one process group); a kill does not
                for job in [job for job, s in list(state.items()) if s == "running"]:
                    job.interrupt()
        finally:
            handling.clear()
    # Handlers, not KeyboardInterrupt: an interrupted join() can report a running thread as finished, and
    # a kill (SIGTERM, SIGHUP) must not leave the runs, or the MPS daemon, running without ablate.py.
    previous = {sig: signal.signal(sig, interrupt) for sig in stop_signals()}
    workers = [threading.Thread(target=worker, args=(gpu,), daemon=True) for gpu in slots]
    for t in workers:
        t.start()
    try:
        next_line, mark = start + STATUS_EVERY, None
        while alive := [t for t in workers if t.is_alive()]:
            alive[0].join(timeout=max(0.1, next_line - time.monotonic()))
            if len(slots) > 1 and time.monotonic() >= next_line:  # one run at a time echoes its own log
                with lock:
                    now = dict(state)
                line, mark = progress_line(now, before, time.monotonic() - start, mark)
                with lock:
                    print(line, flush=True)
                next_line = time.monotonic() + STATUS_EVERY
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    hours, done = (time.monotonic() - start) / 3600, len(jobs) - len(failed)
    if jobs:
        print(f"{done} runs finished in {hours * 60:.1f} min, {len(slots)} at a time: {done / hours:.1f} runs per hour")
    return failed, stop.is_set()


def stop_signals():
    """The signals that stop ablate.py as Ctrl-C does: Ctrl-C, a kill, a closed terminal; not one it was
    told to ignore (nohup ignores SIGHUP)."""
    signals = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    return [sig for sig in signals if signal.getsignal(sig) != signal.SIG_IGN]


def progress_line(state, before, elapsed, last=None):
    """One line on all the runs: the steps trained of all, how many runs are in each state, and the time
    left at the pace since the last line, `last` = (steps trained, elapsed) there. None on the first
    line: the runs spend their first minute compiling (the recipe on an H200 trained 262 steps in its
    first minute, 9,486 in its second). The steps a run had when it resumed do not count toward the
    pace. Returns the line and this line's `last`."""
    total = done = new = left = 0
    counts = dict.fromkeys(("running", "waiting", "done", "failed"), 0)
    for job, s in state.items():
        if s == "waiting":
            began = steps = before[job]
        else:  # from its train.out, if it has logged a step: a resumed run's first line is its checkpoint
            logged = job.steps_logged()
            began = (logged[0] if logged else before[job]) if job.resuming else 0
            steps = job.max_iters if s == "done" else logged[1] if logged else before[job]
        counts[s] += 1
        total, done, new = total + job.max_iters, done + steps, new + steps - began
        if s in ("running", "waiting"):
            left += job.max_iters - steps
    runs = ", ".join(f"{n} {s}" for s, n in counts.items() if n or s != "failed")
    pace = ""
    if last is not None and new > last[0] and left:
        pace = f"; ~{(elapsed - last[1]) * left / (new - last[0]) / 60:.1f} min left at this pace"
    return (f"[{elapsed / 60:.1f} min] {done:,} of {total:,} steps ({100 * done // max(1, total)}%), {runs}{pace}",
            (new, elapsed))


def pick_slots(spec, per_gpu=None, cores=None):
    """One entry per run that may go at once: each GPU id per_gpu times, or [None] without a GPU
    (one run at a time on the CPU, whose cores a run's threads already use). per_gpu None: 8, or
    fewer where the runs would then outnumber half the CPU cores (baby GPTs launching kernels one by
    one were bound by their host: on an H200 with 16 cores, 16 at once trained fewer steps a second
    than 4). Through MPS, with CUDA graphs, 16 at once finished 9% more 1000-step runs an hour than 8."""
    if spec != "auto":
        ids = spec.split(",")
    elif (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:  # the ids as they are, not renumbered
        ids = [g for g in visible.split(",") if g.strip()]
    else:
        import torch
        ids = [str(i) for i in range(torch.cuda.device_count())]
    if per_gpu is None:
        per_gpu = max(1, min(8, (cores or os.cpu_count() or 1) // (2 * max(1, len(ids)))))
    return [gpu for gpu in ids for _ in range(per_gpu)] or [None]


MPS_CONTROL = "nvidia-cuda-mps-control"
# a CUDA process through the daemon, on each of its GPUs (their number: the argument)
MPS_PROBE = [sys.executable, "-c", "import sys, torch; n = torch.cuda.device_count(); "
             "assert n == int(sys.argv[1]), f'{n} GPUs visible'; [torch.ones(1, device=i).sum().item() for i in range(n)]"]


@contextlib.contextmanager
def shared_gpus(mode, slots):
    """CUDA MPS for runs that share a GPU. Without it the processes on one GPU take turns, one at a time;
    with it their kernels run side by side: 8 baby GPTs on an H200 finished 1.35x sooner
    (results/training_speed.md). Yields env_for(slot): the environment that puts a run on that slot's
    GPU, through a daemon of our own in a private folder (no other process's GPU work goes through it),
    quit when the runs end. mode "auto": MPS where runs share a GPU, taking turns (with a note) where it
    does not start; "true": a one-line error instead of taking turns; "false": taking turns."""
    if mode == "false" or None in slots or len(set(slots)) == len(slots):  # the CPU, or one run a GPU
        if mode == "true":
            fail("--mps=true: no two runs share a GPU here (no GPU, or --per_gpu=1); drop --mps=true")
        yield on_gpu
        return
    gpus = list(dict.fromkeys(slots))
    folder = tempfile.mkdtemp(prefix="ablate-mps-")
    env = {"CUDA_MPS_PIPE_DIRECTORY": folder, "CUDA_MPS_LOG_DIRECTORY": folder}
    why = "was not started"
    try:
        why = mps_start(env, gpus)
        if why is None:
            print(f"CUDA MPS: runs on one GPU run their kernels side by side (should ablate.py die, stop the "
                  f"daemon with: echo quit | CUDA_MPS_PIPE_DIRECTORY={folder} {MPS_CONTROL})", flush=True)
            # the daemon sees our GPUs only, renumbered 0, 1, ...: its runs name them by those numbers
            yield lambda gpu: {**env, "CUDA_VISIBLE_DEVICES": str(gpus.index(gpu))}
        elif mode == "true":
            fail(f"--mps=true: CUDA MPS {why}; run with --mps=false")
        else:
            print(f"note: CUDA MPS {why}, so runs sharing a GPU take turns (--mps=false skips trying)",
                  file=sys.stderr, flush=True)
            yield on_gpu
    finally:
        if why is None:
            mps_quit(env)
        shutil.rmtree(folder, ignore_errors=True)


def mps_start(env, gpus):
    """Starts an MPS control daemon with env's folders for these GPUs and checks that a CUDA process runs
    through it on each. Returns None if it does, else why not (the daemon quit again)."""
    if shutil.which(MPS_CONTROL) is None:
        return f"is not installed (no {MPS_CONTROL} on PATH)"
    daemon = dict(os.environ, **env, CUDA_VISIBLE_DEVICES=",".join(gpus))
    client = dict(os.environ, **env, CUDA_VISIBLE_DEVICES=",".join(map(str, range(len(gpus)))))
    try:
        started = subprocess.run([MPS_CONTROL, "-d"], env=daemon, capture_output=True, text=True, timeout=30)
        if started.returncode:
            why = f"did not start: {' '.join((started.stderr or started.stdout).split()) or f'exit {started.returncode}'}"
        else:
            probe = subprocess.run(MPS_PROBE + [str(len(gpus))], env=client, capture_output=True, text=True,
                                   timeout=120)
            if probe.returncode == 0:
                return None
            last = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
            why = f"started, but a CUDA process could not run through it: {last}"
    except subprocess.TimeoutExpired as e:
        why = f"did not answer in {e.timeout:.0f} s ({' '.join(e.cmd[:2])})"
    except BaseException:  # Ctrl-C: leave no daemon behind
        mps_quit(env, quiet=True)
        raise
    mps_quit(env, quiet=True)
    log = Path(env["CUDA_MPS_LOG_DIRECTORY"]) / "control.log"  # its own account, about to be removed
    last_logged = (log.read_text(errors="replace").strip().splitlines() or [""])[-1] if log.is_file() else ""
    return why + (f" (its control.log: {last_logged})" if last_logged else "")


def mps_quit(env, quiet=False):
    """Stops the daemon of env's folder; unless quiet, says how to if it would not."""
    try:
        result = subprocess.run([MPS_CONTROL], input="quit\n", env=dict(os.environ, **env), capture_output=True,
                                text=True, timeout=60)
        trouble = result.returncode and (" ".join((result.stderr or result.stdout).split()) or f"exit {result.returncode}")
    except (OSError, subprocess.TimeoutExpired) as e:
        trouble = str(e)
    if trouble and not quiet:
        print(f"note: the CUDA MPS daemon did not quit ({trouble}); stop it with: echo quit | "
              f"CUDA_MPS_PIPE_DIRECTORY={env['CUDA_MPS_PIPE_DIRECTORY']} {MPS_CONTROL}", file=sys.stderr)


def stat(xs, fmt="{:.4f}"):
    """mean (min..max) over seeds."""
    mean = fmt.format(sum(xs) / len(xs)) if xs else "-"
    return mean if len(xs) < 2 else f"{mean} ({fmt.format(min(xs))}..{fmt.format(max(xs))})"


def report(path, out_root, jobs):
    """<out_root>/results.md, one row per run, and val_loss.png from the logs of the jobs' out_dirs."""
    rows, curves, copies = [], {}, {}
    for run in dict.fromkeys(j.run for j in jobs):
        mine = [j for j in jobs if j.run == run]
        curves[run], copies[run], best, train, final, copy, speed, norm = {}, {}, [], [], [], [], [], []
        for job in mine:
            log = job.log()
            evals = [r for r in log if r.get("val_loss") is not None]
            if not evals:
                continue
            curves[run][job.seed] = [(r["iter"], r["val_loss"]) for r in evals]
            copies[run][job.seed] = [(r["iter"], r["copy_loss"]) for r in evals if r.get("copy_loss") is not None]
            at_best = min(evals, key=lambda r: r["val_loss"])
            best.append(at_best["val_loss"])
            train += [at_best["train_loss"]] if at_best.get("train_loss") is not None else []
            final.append(evals[-1]["val_loss"])
            copy += [at_best["copy_loss"]] if at_best.get("copy_loss") is not None else []
            tps = [r["tokens_per_s"] for r in log if r.get("tokens_per_s")]
            speed += [statistics.median(tps)] if tps else []  # median: robust to steps slowed by compiling
            norms = [r["attn_out_norm"] for r in log if r.get("attn_out_norm")]
            norm += [statistics.mean(norms[-1])] if norms else []  # at the last log step, mean over layers
        last = min((e[-1][0] for e in curves[run].values()), default=None)
        iters = "-" if last is None else f"{last}" + ("" if last == mine[0].max_iters else f" of {mine[0].max_iters}")
        command = mine[0].shown.replace("|", "\\|")  # a | would end the table cell
        rows.append(f"| {run} | {', '.join(map(str, curves[run])) or 'not run'} | {iters} | {stat(best)} | "
                    f"{stat(train)} | {stat(final)} | {stat(copy)} | {stat(speed, '{:,.0f}')} | {stat(norm, '{:.3f}')} | `{command}` |")
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "results.md").write_text(
        f"# {out_root.name}\n\nFrom `{path}`. Each number is the mean over seeds, with (min..max) over seeds. "
        "best = lowest val loss at any eval; train = the loss on training batches at that eval (below softmax's "
        "while val is above: a kind that fits the training text faster and generalises worse); final = val loss at "
        "the last eval; copy = the in-context copy probe's "
        "loss (the second half of a run of val tokens repeated twice) at the best eval; tokens/s = each seed's median "
        "over its log steps; attn out norm = mean over layers of the attention output's L2 norm per token at the "
        "last log step (--log_attn_norm). The command is the first seed's; the others differ in --out_dir and "
        "--seed.\n\n"
        "| run | seeds | iters | best val loss | train loss there | final val loss | copy loss | tokens/s | attn out norm "
        "| command |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(f"wrote {out_root / 'results.md'}")
    plot(curves, copies, out_root)


def plot(curves, copies, out_root):
    """val_loss.png: val loss, and beside it the copy probe's loss where the logs have it; each
    {run: {seed: [(iter, loss)]}} as one colour per run, its seeds faint, their mean bold."""
    try:
        import matplotlib
    except ImportError:
        print("val_loss.png skipped: matplotlib is not installed (pip install matplotlib)")
        return
    matplotlib.use("Agg")  # write files, need no display
    import matplotlib.pyplot as plt
    panels = [(curves, "val loss")] + ([(copies, "copy loss")] if any(e for c in copies.values() for e in c.values()) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5), squeeze=False)
    for ax, (panel, name) in zip(axes[0], panels):
        for i, (run, by_seed) in enumerate(panel.items()):
            by_seed = {seed: evals for seed, evals in by_seed.items() if evals}
            for evals in by_seed.values():
                ax.plot(*zip(*evals), color=f"C{i}", alpha=0.25, lw=0.8)
            common = sorted(set.intersection(*(set(dict(e)) for e in by_seed.values()))) if by_seed else []
            if common:  # the mean where every seed has an eval
                ax.plot(common, [statistics.mean(dict(e)[it] for e in by_seed.values()) for it in common],
                        color=f"C{i}", lw=1.8, label=run + (f" (mean of {len(by_seed)} seeds)" if len(by_seed) > 1 else ""))
        points = [point for by_seed in panel.values() for evals in by_seed.values() for point in evals]
        if points:  # the top leaves out the first tenth of training (loss ~ log(vocab)) so the differences show
            last = max(it for it, _ in points)
            top = max(v for it, v in points if it >= last / 10)
            ax.set_ylim(top=top + 0.05 * (top - min(v for _, v in points)))
            ax.legend()
        ax.set(xlabel="iteration", ylabel=name, title=f"{out_root.name}: {name} (faint: single seeds)")
        ax.grid(alpha=0.3)
    fig.savefig(out_root / "val_loss.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out_root / 'val_loss.png'}")


def main(argv):
    argv, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = OneLineParser(prog="tools/ablate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ablation", help="the ablation file, e.g. ablations/sigmoid_recipe.toml")
    p.add_argument("--seeds", help="comma-separated seeds instead of the file's, e.g. 1337,1338")
    p.add_argument("--only", help="comma-separated run names: run only these (the report covers every run)")
    p.add_argument("--gpus", default="auto", help="auto (every visible GPU) or ids like 0,1")
    p.add_argument("--per_gpu", type=int, help="runs at once on each GPU (default 8, or fewer so that all runs "
                   "at once stay within half the CPU cores: baby GPTs are bound by their host)")
    p.add_argument("--mps", choices=("auto", "true", "false"), default="auto",
                   help="CUDA MPS, so that runs sharing a GPU run their kernels side by side. auto: where runs "
                   "share a GPU and MPS starts, else they take turns; true: stop with an error where it cannot; "
                   "false: runs take turns")
    p.add_argument("--force", action="store_true", help="start every (run, seed) afresh, finished or not")
    p.add_argument("--dry_run", action="store_true", help="check every config and print the commands; run nothing")
    p.add_argument("--report_only", action="store_true", help="only write results.md and val_loss.png from the logs")
    a, unknown = p.parse_known_args(argv)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}; give train.py overrides after --")
    if a.per_gpu is not None and a.per_gpu < 1:
        fail(f"--per_gpu must be at least 1, got {a.per_gpu}")
    for flag, value in (("--seeds", a.seeds), ("--gpus", None if a.gpus == "auto" else a.gpus)):
        if value is not None and not re.fullmatch(r"\d+(,\d+)*", value):
            fail(f"{flag} expects comma-separated integers like 0,1, got {value!r}")
    try:
        out_root, seeds, runs = load_ablation(a.ablation, extra)
    except ConfigError as e:
        fail(e)
    only = a.only.split(",") if a.only else list(runs)
    for name in (n for n in only if n not in runs):
        close = difflib.get_close_matches(name, runs, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"it has {', '.join(runs)}"
        fail(f"--only: no run {name!r} in {a.ablation}; {hint}")
    chosen = [int(s) for s in a.seeds.split(",")] if a.seeds else seeds
    jobs = [Job(run, seed, out_root, runs[run]) for run in runs if run in only for seed in chosen]
    # the report covers every run and seed with a log, not only those --only and --seeds pick this time
    reported = [Job(run, seed, out_root, runs[run]) for run in runs for seed in dict.fromkeys(seeds + chosen)]
    if a.report_only:
        report(a.ablation, out_root, reported)
        return 0
    todo = [job for job in jobs if a.force or not job.finished()]
    for job in todo:
        if not a.force and (job.out_dir / "ckpt.pt").is_file():
            job.resume()
    problems = check_data(todo, runs, a.dry_run)
    for line in problems:
        print(f"{'note' if a.dry_run else 'error'}: {line}", file=sys.stderr)
    if problems and not a.dry_run:
        return 2  # before any run starts
    for job in jobs:
        if job not in todo:
            print(f"# finished, skipped: {job.shown}")
        elif a.dry_run:
            print(job.shown)
    if a.dry_run:
        return 0
    # the first seed of every run, then the second...: a run's later seeds find its compiled graphs
    # in the inductor cache (shared by every run of this user), instead of compiling them alongside
    todo.sort(key=lambda job: chosen.index(job.seed))
    slots = pick_slots(a.gpus, a.per_gpu)
    for sig in set(stop_signals()) - {signal.SIGINT}:  # a kill while the MPS daemon starts: as Ctrl-C, so it is quit
        signal.signal(sig, signal.default_int_handler)
    with shared_gpus(a.mps if len(todo) > 1 else "false", slots) as env_for:  # one run shares nothing
        failed, interrupted = run_all(todo, slots, env_for)
    report(a.ablation, out_root, reported)
    if interrupted:
        print("interrupted: the same command again skips finished runs and resumes the others", file=sys.stderr)
        return 130
    if failed:
        names = ", ".join(f"{j.run}/seed{j.seed}" for j in failed)
        print(f"{len(failed)} of {len(todo)} runs failed: {names}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # before or after the runs (run_all handles it during them)
        sys.exit(130)
