"""
Train a GPT with softmax or sigmoid attention on one CPU or GPU, or on several GPUs with DDP.

    python train.py                  # shakespeare_char: the GPU or (no GPU) the CPU preset
    python train.py presets/shakespeare_char.toml --attn=sigmoid --max_iters=2000
    python train.py presets/shakespeare_char.toml --init_from=resume   # continue out_dir's ckpt.pt
    python train.py --help           # every config key, with its type, default and help
    torchrun --standalone --nproc_per_node=8 train.py presets/gpt2_124m.toml      # DDP on one node
    # DDP on 2 nodes: run on both, with --node_rank=0 on the node whose address is master_addr
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 \\
        --master_port=29500 train.py ...
    # (NCCL_IB_DISABLE=1 in front if the nodes have no InfiniBand)

out_dir (the presets' name the attention kind: out-shakespeare-char-{attn}) gets ckpt.pt, the
latest state (written atomically at evals where val loss improves, at every eval with
always_save_checkpoint, and at the end), best.pt, the lowest val loss, and log.jsonl (one JSON
object per log step). A resumed run restores the model, optimizer, RNG states and the position of
the data stream, so on CPU it is bit-identical to a run that was never stopped.
Exit status: 0 done, 1 error, 2 bad config, 130 Ctrl-C.
"""
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import sys
import textwrap
import time
import traceback
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from attention import check_attention_config, resolve_recipe
from configurable import (ConfigError, TrainConfig, config_to_dict, load_config, load_preset,
                          parse_args, split_argv)
from model import (GPT, GPTConfig, ModelLoadError, checkpoint_model_args, load_checkpoint_file,
                   resolve_device, resolve_dtype)
from prepare_data import DataError, check_bin, load_meta, prepare, tokenizer_from_meta

HERE = Path(__file__).resolve().parent
EVAL_BATCHES_PER_PASS = 8  # evaluation runs 8 batches per forward pass: fewer, larger launches
NOT_YET = 2**62  # the on-device "first iteration with a non-finite loss" before there is one
RESUME_MAY_CHANGE = ("dropout", "sigmoid_backend")  # model keys that leave the weights as they are
# set by the weights for init_from=gpt2*
GPT2_SHAPE = ("n_layer", "n_head", "n_kv_head", "n_embd", "bias", "pos_emb", "qk_norm")
CPU_PRESET = "shakespeare_char_cpu.toml"
LONG_CPU_RUN = 30 * 60  # seconds: a CPU run projected to take longer gets a warning
# what the error handlers at the bottom report: where the run is and where its last checkpoint is;
# and when a signal first stopped it (stop_as_ctrl_c)
progress = dict(argv=[], rank=0, ddp=False, iter=0, ckpt="out/ckpt.pt", ckpt_iter=None, stopped_at=None,
                saving=False, stop_after_save=False)


# keys that change how a run is watched or where it runs, not what it learns: a new run may differ
# in these from the checkpoint it replaces in out_dir
NOT_THE_RUN = ("out_dir", "overwrite", "init_from", "eval_only", "log_interval", "log_attn_norm",
               "sample_tokens", "wandb_log", "wandb_project", "wandb_run_name", "device", "compile",
               "cuda_graphs", "backend", "always_save_checkpoint")


class TrainError(Exception):
    """A problem during the run that the user can act on; the message is one line."""


def default_preset():
    """The preset a command line without one gets: the GPU baby GPT, or its CPU-sized version."""
    if torch.cuda.is_available():
        return "presets/shakespeare_char.toml"
    return f"presets/{CPU_PRESET}"


def help_description(default):
    """--help's text above the keys: which preset applies when none is given, what it changes."""
    machine = f"this machine has {'a' if torch.cuda.is_available() else 'no'} CUDA GPU"
    values = load_preset(HERE / default)
    defaults = config_to_dict(TrainConfig())
    changed = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                        for k, v in values.items() if v != defaults[k])
    note = (f"With no preset given, {default} is applied first ({machine}; the GPU preset is "
            "presets/shakespeare_char.toml, the CPU one presets/shakespeare_char_cpu.toml). "
            f"It sets {changed}. The defaults listed below are those before any preset.")
    return "Train a GPT with softmax or sigmoid attention.\n\n" + textwrap.fill(note, 100)


def load_train_config(argv, master):
    """The command line -> a checked TrainConfig; raises ConfigError."""
    default = default_preset()
    if "-h" in argv or "--help" in argv:
        parse_args(argv, TrainConfig, "train.py", help_description(default))  # exits
    presets, _ = split_argv(argv)
    if not presets and master:
        print(f"no preset given: using {default}")
    cfg = load_config(argv, TrainConfig, default_presets=[str(HERE / default)])
    for key in ("n_layer", "n_head", "n_embd", "batch_size", "block_size",
                "gradient_accumulation_steps", "eval_interval", "log_interval", "eval_iters"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("max_iters", "warmup_iters", "sample_tokens", "grad_clip", "min_lr",
                "weight_decay"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key} must be 0 or more, got {getattr(cfg, key)}")
    for key in ("dropout", "beta1", "beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be at least 0 and below 1, got {getattr(cfg, key)}")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"--learning_rate must be more than 0, got {cfg.learning_rate}")
    check_attention_config(cfg)
    return resolve_recipe(cfg)  # auto recipe keys made concrete, so checkpoints and logs say what ran


def pick_device(cfg, local_rank):
    """(device, device type, dtype name) from --device, --dtype and the hardware; raises
    ConfigError."""
    device, kind = resolve_device(cfg.device)
    if kind == "cuda" and local_rank is not None:
        device = f"cuda:{local_rank}"  # DDP: one GPU per rank
    dtype = resolve_dtype(cfg.dtype, kind)
    if dtype == "float16" and kind != "cuda":
        raise ConfigError(f"--dtype=float16 is for CUDA GPUs (it needs a GradScaler): use float32 "
                          f"or bfloat16 on {kind}")
    return device, kind, dtype


def use_cuda_graphs(cfg, kind, ddp, accum):
    """Whether the compiled model replays CUDA graphs (torch.compile's mode="reduce-overhead"): a
    step's hundreds of kernels then cost one launch of host time. A small model's step is otherwise
    bound by the host: the baby GPT's took 17.3 ms with sigmoid (its custom ops' launches) and 9.9
    with softmax, 6.5 and 6.1 as graphs (results/training_speed.md). Auto: on in one process on a
    GPU with one micro-step per step (accum: this rank's); off under DDP (not measured there) and
    with gradient accumulation, refused there when asked for: adding a micro-step's gradients to the
    last one's reads a graph output that the next replay has overwritten (torch raises)."""
    if cfg.cuda_graphs and not (cfg.compile and kind == "cuda"):
        raise ConfigError("--cuda_graphs=true replays compiled CUDA graphs: it needs --compile=true and a "
                          "CUDA device; drop it or set --cuda_graphs=auto")
    if cfg.cuda_graphs and accum > 1:
        raise ConfigError(f"--cuda_graphs=true cannot accumulate gradients over {accum} micro-steps a rank "
                          f"(--gradient_accumulation_steps={cfg.gradient_accumulation_steps}): a replay overwrites "
                          f"the last micro-step's; set --cuda_graphs=auto, or one micro-step a rank with a larger "
                          f"--batch_size for the same tokens a step")
    if cfg.cuda_graphs is None:
        return cfg.compile and kind == "cuda" and not ddp and accum == 1
    return cfg.cuda_graphs


def run_folder(cfg):
    """--out_dir with each {key} replaced by that key's value: out-{attn} -> out-sigmoid."""
    try:
        return Path(cfg.out_dir.format(**config_to_dict(cfg)))
    except KeyError as e:
        raise ConfigError(f"--out_dir={cfg.out_dir!r} names {{{e.args[0]}}}, which is not a config "
                          f"key: use a key such as {{attn}}, or no braces") from None
    except (IndexError, ValueError):
        raise ConfigError(f"--out_dir={cfg.out_dir!r} has a brace that is not part of a {{key}}: "
                          f"remove it") from None


def check_new_run(cfg, path):
    """A new run stops before it would silently replace the checkpoint of another config's run."""
    if cfg.init_from == "resume" or cfg.eval_only or cfg.overwrite or not path.exists():
        return
    fix = "choose another --out_dir, or add --overwrite to replace it"
    try:
        ckpt = load_checkpoint_file(path)
    except ModelLoadError as e:
        raise TrainError(f"{e}; {fix}") from None
    old = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(old, dict):
        raise TrainError(f"{path} was not written by train.py: {fix}")
    new = config_to_dict(cfg)
    same_anyway = NOT_THE_RUN + (GPT2_SHAPE if cfg.init_from.startswith("gpt2") else ())
    keys = [k for k in new if k in old and k not in same_anyway and old[k] != new[k]]
    if keys:
        have, want = (", ".join(f"{k}={c[k]}" for k in keys) for c in (old, new))
        raise TrainError(f"{path} holds another run ({have}; this run: {want}): {fix}")


def check_writable(out_dir):
    """Fail before training, not at the first checkpoint, when out_dir can't be written."""
    probe = out_dir / ".write_test"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(bytes(4096))
        probe.unlink()
    except OSError as e:
        raise TrainError(f"cannot write to --out_dir={out_dir} ({e.strerror or e}): "
                         f"choose a folder you can write to") from None


def load_data(cfg, master):
    """meta.json and {split: (the open token file, its token count)}; shakespeare_char is prepared if
    missing."""
    folder = Path(cfg.data_dir) / cfg.dataset
    if master and cfg.dataset == "shakespeare_char" and not (folder / "meta.json").exists():
        print(f"{folder} not found: preparing it, as python prepare_data.py would")
        prepare("shakespeare_char", cfg.data_dir)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait while rank 0 prepares the data
    meta = load_meta(folder)
    splits = {}
    for split in ("train", "val"):
        # opened before the check, so the file checked is the one read (unless another took its name)
        file = None
        with suppress(OSError):  # a missing file: check_bin says so in one line
            file = open(folder / f"{split}.bin", "rb")
        tokens = check_bin(folder, meta, split)  # one line for a missing, short or corrupt file
        if file is None or not os.path.samestat(os.fstat(file.fileno()), os.stat(tokens.filename)):
            if file is not None:
                file.close()
            raise TrainError(f"{tokens.filename} changed while the run started (prepare_data.py writing it?): "
                             f"run again once it is written")
        if len(tokens) <= cfg.block_size:  # a sequence is block_size tokens and its next one
            fix = (f"use --block_size={len(tokens) - 1} or less, or more text" if len(tokens) > 1
                   else "prepare the dataset from more text")
            raise TrainError(f"{tokens.filename} has {plural(len(tokens), 'token')}, too few for "
                             f"block_size={cfg.block_size}: {fix}")
        # kept open: a run reads the file it started with to its end, also when prepare_data.py
        # renames a new file over it or it is deleted meanwhile (not when it is overwritten in place)
        splits[split] = (file, len(tokens))
    return meta, splits


def plural(n, word):
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def get_batch(file, dtype, ix, block_size, device):
    """Inputs x and targets y (B, T) from token offsets ix (B,) of a token file (open, or its path);
    y is x shifted by one token."""
    data = np.memmap(file, dtype=dtype, mode="r")  # mapped anew per batch: a kept map leaks (nanoGPT)
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix.tolist()]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size]
                                   for i in ix.tolist()]).astype(np.int64))
    if device.startswith("cuda"):  # pinned memory: the copy to the GPU runs while the host moves on
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT); not tied to
    max_iters, so a run stopped early and resumed follows the same schedule."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def load_checkpoint(path):
    if not path.is_file():
        raise TrainError(f"--init_from=resume but there is no checkpoint at {path}: "
                         f"point --out_dir at the run to resume, or start one with "
                         f"--init_from=scratch")
    try:
        ckpt = load_checkpoint_file(path)
    except ModelLoadError as e:
        raise TrainError(str(e)) from None
    needed = ("model", "optimizer", "model_args", "dataset_meta", "iter_num", "best_val_loss",
              "rng")
    missing = [k for k in needed if k not in ckpt] if isinstance(ckpt, dict) else ["everything"]
    if missing:
        raise TrainError(f"{path} lacks {', '.join(missing)}: it was not written by train.py, "
                         f"so it can't be resumed")
    return ckpt


def check_resumable(cfg, meta, ckpt, path):
    """One line naming what differs when the checkpoint is another model or another dataset."""
    want = dataclasses.asdict(GPTConfig.from_train_config(cfg, meta["vocab_size"]))
    have = checkpoint_model_args(ckpt)
    # a GPT-2 finetune is resumed with the command that started it: its shape is the checkpoint's
    from_gpt2 = str((ckpt.get("config") or {}).get("init_from")).startswith("gpt2")
    skip = RESUME_MAY_CHANGE + ("vocab_size",) + (GPT2_SHAPE if from_gpt2 else ())
    keys = [k for k in want if k not in skip and have.get(k) != want[k]]
    if keys:
        its = ", ".join(f"{k}={have.get(k)}" for k in keys)
        raise TrainError(f"{path} holds another architecture: it has {its}, "
                         f"this run asks for {', '.join(f'{k}={want[k]}' for k in keys)}; "
                         f"pass the settings it was trained with, or use another --out_dir")
    old = ckpt.get("dataset_meta") or {}
    keys = [k for k in ("name", "tokenizer", "vocab_size", "chars") if old.get(k) != meta.get(k)]
    if keys:
        raise TrainError(f"{path} was trained on another dataset ({', '.join(keys)} differ: it "
                         f"used {old.get('name')!r}, {old.get('tokenizer')}, vocab "
                         f"{old.get('vocab_size')}; this run uses {meta['name']!r}, "
                         f"{meta['tokenizer']}, vocab {meta['vocab_size']}): resume with its "
                         f"--dataset, or use another --out_dir")


def build_model(cfg, meta, ckpt, ckpt_path):
    if cfg.init_from == "scratch":
        return GPT(GPTConfig.from_train_config(cfg, meta["vocab_size"]))
    if cfg.init_from == "resume":
        check_resumable(cfg, meta, ckpt, ckpt_path)
        override = {k: getattr(cfg, k) for k in RESUME_MAY_CHANGE}
        return GPT.from_checkpoint(ckpt, override_args=override)
    if meta["tokenizer"] != "gpt2":
        raise TrainError(f"--init_from={cfg.init_from} needs a GPT-2-tokenized dataset, but "
                         f"{meta['name']} is "
                         f"{meta['tokenizer']}-level: use e.g. --dataset=shakespeare")
    # n_layer, n_head, n_embd come from GPT-2
    keys = ("dropout", "block_size", "attn", "sigmoid_bias", "sigmoid_backend", "qk_norm",
            "layerscale", "layerscale_init", "hybrid_norm", "pos_emb", "n_kv_head")
    return GPT.from_pretrained(cfg.init_from, {k: getattr(cfg, k) for k in keys})


def eval_offsets(n_tokens, cfg):
    """The token offsets of the windows an evaluation scores: the split cut into consecutive
    block_size windows, every one if they fit in eval_iters batches, else eval_iters * batch_size
    of them evenly spaced. A small split is scored whole, once (tinyshakespeare's val split is 435
    windows of 256: 200 random batches of 64 would sample it 29 times over); a larger one by a fixed
    sample, as far from the whole split's loss as a random sample of that size
    (results/training_speed.md) but the same in every evaluation of every run, so curves and runs
    compare without sampling noise."""
    windows = (n_tokens - 1) // cfg.block_size  # the targets run one token past each window
    wanted = cfg.eval_iters * cfg.batch_size
    picked = torch.arange(windows) if windows <= wanted else torch.arange(wanted) * windows // wanted
    return picked * cfg.block_size


@torch.no_grad()
def estimate_loss(model, splits, dtype, cfg, ctx, device, rank, world, per_pass=EVAL_BATCHES_PER_PASS):
    """Mean loss per split over the windows of eval_offsets; each rank scores windows rank, rank +
    world, ... Up to per_pass batches of rows go through the model at once (without gradients a
    forward pass holds about one layer's activations, so 8 batches need less memory than a training
    step); a short last pass, or a split shorter than one pass, is padded to the same shape, so
    nothing recompiles, with its padding targets set to -1, which the loss ignores. Every window has block_size targets, so the mean of
    the passes' means weighted by their rows is the mean over windows."""
    model.eval()
    out = {}
    for split, (file, n_tokens) in splits.items():
        mine = eval_offsets(n_tokens, cfg)[rank::world]
        rows = cfg.batch_size * per_pass  # one shape for every split and the copy probe: one compile
        total = torch.zeros(2, device=device)  # (sum of losses, windows) on this rank
        for k in range(0, len(mine), rows):
            n = len(mine[k:k + rows])
            x, y = get_batch(file, dtype, mine[torch.arange(k, k + rows) % len(mine)], cfg.block_size, device)
            y[n:] = -1  # the padding rows, copies of earlier windows
            if cfg.cuda_graphs:  # the last pass's loss is added up: this pass may replay over it
                torch.compiler.cudagraph_mark_step_begin()
            with ctx:
                _, loss = model(x, y)
            total[0] += loss.float() * n
            total[1] += n
        if world > 1:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


def duration(seconds):
    """12s, 4m05s or 3h07m."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s // 60 % 60:02d}m"


class Eta:
    """Time since the start, and the time left at the mean step time (evaluations included) since
    the first step of this process, which is left out: it compiles and warms up."""

    def __init__(self, max_iters):
        self.max_iters, self.start, self.warm = max_iters, time.perf_counter(), None

    def step_done(self, iter_num):
        if self.warm is None:
            self.warm = (iter_num, time.perf_counter())

    def left(self, iter_num):
        """Seconds left after step iter_num; None before a step past the first was timed."""
        if self.warm is None or iter_num <= self.warm[0]:
            return None
        per_step = (time.perf_counter() - self.warm[1]) / (iter_num - self.warm[0])
        return per_step * (self.max_iters - iter_num - 1)

    def text(self, iter_num):
        left = self.left(iter_num)
        eta = "" if left is None else f", ETA {duration(left)}"
        return f"{duration(time.perf_counter() - self.start)} elapsed{eta}"


def slow_cpu_warning(left, presets):
    """One line when a CPU run would take long and the CPU preset is not in use; None otherwise."""
    if left is None or left < LONG_CPU_RUN or CPU_PRESET in [Path(p).name for p in presets]:
        return None
    return (f"warning: at this speed the run ends in about {duration(left)} on the CPU; "
            f"presets/{CPU_PRESET} trains a smaller model in minutes")


class NanWatch:
    """The first iteration whose loss was nan or inf, kept as a tensor (no host sync per step);
    check() stops the run there, agreeing over all ranks, so nothing after it gets saved."""

    def __init__(self, device):
        self.iter = torch.tensor(NOT_YET, device=device)
        self.loss = torch.tensor(math.nan, device=device)

    def step(self, loss, iter_num):
        first = ~loss.isfinite() & (self.iter == NOT_YET)
        self.iter = torch.where(first, iter_num, self.iter)
        self.loss = torch.where(first, loss, self.loss)

    def check(self, losses=None, iter_num=None):
        """Also checks evaluation losses, all-reduced already, so every rank stops alike."""
        if dist.is_initialized():
            dist.all_reduce(self.iter, op=dist.ReduceOp.MIN)
        if self.iter.item() != NOT_YET:
            raise not_finite(self.loss.item(), self.iter.item())
        bad = [loss for loss in (losses or {}).values() if not math.isfinite(loss)]
        if bad:
            raise not_finite(bad[0], iter_num)


@torch.no_grad()
def copy_probe_loss(model, split, dtype, cfg, ctx, device, n_seqs=64, seed=0):
    """In-context copying: the mean loss on the second half of n_seqs sequences [run, run], each run
    block_size // 2 consecutive tokens of split (train.py gives the val split). Only the repeat's
    tokens after its first are scored: a model that can look back block_size // 2 tokens (induction
    heads) predicts them nearly exactly; one that cannot scores about its val loss. Val, not train,
    tokens: a run that has seen its training text many times predicts that text from memory, and the
    probe would measure memory (a training-text probe fell from 3.55 to 3.00 while the val loss of
    the same run rose from 4.49 to 4.79, results/sigmoid_vs_softmax.md).
    The runs come from their own generator with a fixed seed: every run on the same data and
    block_size, of either kind and any seed, sees the same probe, and the training stream is
    untouched. Passes of EVAL_BATCHES_PER_PASS batches (the last padded with ignored rows) keep
    evaluation's shapes: nothing recompiles."""
    (file, n_tokens), half = split, cfg.block_size // 2
    ix = torch.randint(n_tokens - half, (n_seqs,), generator=torch.Generator().manual_seed(seed))
    run, _ = get_batch(file, dtype, ix, half, device)  # (n_seqs, half)
    x = torch.cat([run, run], dim=1)  # (n_seqs, 2 * half)
    y = torch.full_like(x, -1)  # -1: not scored (cross_entropy's ignore_index)
    y[:, half:-1] = x[:, half + 1:]  # position half + i predicts run[i + 1]
    rows = cfg.batch_size * EVAL_BATCHES_PER_PASS
    pad = -n_seqs % rows
    x, y = torch.cat([x, x.new_zeros(pad, x.size(1))]), torch.cat([y, y.new_full((pad, y.size(1)), -1)])
    model.eval()
    total, count = 0.0, 0
    for k in range(0, len(x), rows):
        yk = y[k:k + rows]
        if cfg.cuda_graphs:  # the last pass's loss is read: this pass may replay over it
            torch.compiler.cudagraph_mark_step_begin()
        with ctx:
            _, loss = model(x[k:k + rows], yk)
        n = (yk != -1).sum().item()
        total, count = total + loss.float().item() * n, count + n
    model.train()
    return total / count


def not_finite(loss, iter_num):
    """The error for a nan or inf loss, a training or an evaluation one."""
    where = (f"the last good checkpoint is {progress['ckpt']} (iter {progress['ckpt_iter']})"
             if progress["ckpt_iter"] is not None else "no checkpoint was written")
    return TrainError(f"loss became {loss} at iter {iter_num}; {where}; "
                      f"try a lower --learning_rate or a longer --warmup_iters")


def restore(ckpt, optimizer, scaler, train_gen, cfg, rank, device):
    """Put a resumed run where its checkpoint left off: the optimizer (with this run's settings),
    the scaler, this rank's dropout RNG and the training data stream. Returns iter_num, best_val_loss."""
    optimizer.load_state_dict(ckpt["optimizer"])
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # group 0 decays: see the model
    for group in optimizer.param_groups:  # this run's betas, not the checkpoint's (lr: every step)
        group["betas"] = (cfg.beta1, cfg.beta2)
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    if rank < len(rng["torch"]):  # a rank the saving run did not have keeps its fresh seed
        torch.set_rng_state(rng["torch"][rank])
        if device.startswith("cuda") and rank < len(rng.get("cuda", [])):
            torch.cuda.set_rng_state(rng["cuda"][rank], device)
    train_gen.set_state(rng["train_data"])  # (older checkpoints also hold an unused "eval_data")
    return ckpt["iter_num"], ckpt["best_val_loss"]


def rng_states(device, train_gen):
    """Every rank's dropout RNG (gathered for rank 0: every rank must call this) and the state of
    the training data stream."""
    mine = [torch.get_rng_state()]
    if device.startswith("cuda"):
        mine.append(torch.cuda.get_rng_state(device))
    every = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    cuda = {"cuda": [r[1] for r in every]} if device.startswith("cuda") else {}
    return {"torch": [r[0] for r in every], **cuda, "train_data": train_gen.get_state()}


def training_state(model, optimizer, scaler, cfg, meta, rng):
    """What a checkpoint holds besides the losses and iteration numbers."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "model_args": dataclasses.asdict(model.config), "config": config_to_dict(cfg),
            "dataset_meta": meta, "rng": rng,
            **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {})}


def save_checkpoint(path, ckpt):
    """torch.save to ckpt.pt.tmp, fsync, rename over ckpt.pt: a crash or a full disk leaves the
    old one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)  # make the rename itself durable
        os.close(fd)
    except (OSError, RuntimeError) as e:  # torch.save reports some write errors as RuntimeError
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
        raise TrainError(f"could not write {path} ({reason}); the previous checkpoint is kept: "
                         f"free some disk space or choose another --out_dir") from None
    finally:
        with suppress(OSError):
            tmp.unlink()


def keep_as_best(ckpt_path, best_path):
    """best.pt becomes the checkpoint just written: a hard link (no copy; ckpt.pt's next save
    replaces its name, not the file), or a copy where links are not allowed; atomic either way."""
    tmp = best_path.with_name(best_path.name + ".tmp")
    try:
        with suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(ckpt_path, tmp)
        except OSError:
            shutil.copyfile(ckpt_path, tmp)
        os.replace(tmp, best_path)
    except OSError as e:
        raise TrainError(f"could not write {best_path} ({e.strerror or e}); {ckpt_path} is saved: "
                         f"free some disk space or choose another --out_dir") from None


class Checkpoints:
    """out_dir's ckpt.pt, the latest saved state (what --init_from=resume continues), and best.pt,
    the lowest val loss (what sample.py reads); remembers what each holds for the last lines."""

    def __init__(self, out_dir):
        self.latest, self.best = out_dir / "ckpt.pt", out_dir / "best.pt"
        self.held = {}  # {"latest" or "best": (iter, val loss)}

    def resumed(self, ckpt):
        self.held["latest"] = (ckpt["iter_num"], ckpt.get("val_loss", math.nan))
        if self.best.exists() and ckpt.get("best_iter") is not None:
            self.held["best"] = (ckpt["best_iter"], ckpt["best_val_loss"])

    def save(self, state, iter_num, val_loss, best_val_loss, improved):
        best_iter = iter_num if improved else self.held.get("best", (None,))[0]
        save_checkpoint(self.latest, {**state, "iter_num": iter_num, "val_loss": val_loss,
                                      "best_val_loss": best_val_loss, "best_iter": best_iter})
        self.held["latest"] = (iter_num, val_loss)
        if improved:
            keep_as_best(self.latest, self.best)
            self.held["best"] = (iter_num, val_loss)
        print(f"saved {self.latest}" + (f" and {self.best}" if improved else ""))

    def report(self, best_val_loss, eval_only):
        """The last lines: the best val loss, and which file holds the best and which the latest."""
        lines = [f"best val loss {best_val_loss:.4f}"]
        if not eval_only and "best" in self.held:
            lines[0] += f" (iter {self.held['best'][0]}): {self.best}, the model sample.py reads"
        if not eval_only and "latest" in self.held:
            it, loss = self.held["latest"]
            lines.append(f"latest: iter {it}, val loss {loss:.4f}: {self.latest}, "
                         f"which --init_from=resume continues")
        return "\n".join(lines)


def start_log(path, resume_iter):
    """A new run starts log.jsonl empty; a resumed one keeps the lines before its checkpoint."""
    keep = []
    if resume_iter is not None and path.exists():
        for line in path.read_text().splitlines():
            with suppress(ValueError, KeyError, TypeError):  # a line cut short by a crash: dropped
                if json.loads(line)["iter"] < resume_iter:
                    keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def log_line(record, max_iters, eta):
    """iter 250/5000 (5%): loss, lr, speed, [mfu where the peak is known,] times."""
    it = record["iter"]
    mfu = "" if record["mfu"] is None else f", mfu {record['mfu'] * 100:.1f}%"
    norms = ""
    if "attn_out_norm" in record:
        norms = f", attn out norm {' '.join(f'{n:.3f}' for n in record['attn_out_norm'])}"
    return (f"iter {it}/{max_iters} ({100 * (it + 1) // max_iters}%): loss {record['loss']:.4f}, "
            f"lr {record['lr']:.2e}, {record['ms_per_iter']:.1f} ms/iter, "
            f"{record['tokens_per_s']:,.0f} tok/s{mfu}{norms}, {eta.text(it)}")


def print_sample(model, meta, n_tokens, device, ctx):
    encode, decode = tokenizer_from_meta(meta)
    start = ("<|endoftext|>" if meta["tokenizer"] == "gpt2"
             else "\n" if "\n" in meta["chars"] else meta["chars"][0])
    x = torch.tensor([encode(start)], dtype=torch.long, device=device)  # (1, T)
    with ctx:
        y = model.generate(x, n_tokens, temperature=0.8, top_k=200)
    print(f"sample of {n_tokens} tokens:\n{decode(y[0, x.size(1):].tolist())}")


def import_wandb(cfg, master):
    if not (cfg.wandb_log and master):
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb_log needs wandb: pip install wandb, or drop --wandb_log") \
            from None
    return wandb


def config_of_model(cfg, model, ckpt):
    """The config to save: it describes the model actually built (GPT-2's shape for gpt2*), and a
    resumed run keeps its checkpoint's init_from (check_resumable reads it to resume a GPT-2
    finetune again)."""
    built = {f.name: getattr(model.config, f.name)
             for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"}
    if ckpt is not None:
        built["init_from"] = (ckpt.get("config") or {}).get("init_from", "resume")
    return dataclasses.replace(cfg, **built)


def train_step(model, optimizer, scaler, load, accum, grad_clip, ctx, ddp, graphs=False):
    """One optimizer step over accum micro-batches, load(k) giving the k-th; returns the step's
    loss, left as a tensor (no host sync). graphs: the model replays CUDA graphs (then accum is 1)."""
    x, y = load(0)
    loss_sum = torch.zeros((), device=x.device)
    for micro in range(accum):
        if graphs:  # a new replay may overwrite the last one's outputs: nothing here keeps them
            torch.compiler.cudagraph_mark_step_begin()
        # DDP all-reduces the gradients in backward: only after the last micro-step
        with model.no_sync() if ddp and micro < accum - 1 else nullcontext():
            with ctx:
                _, loss = model(x, y)
                loss = loss / accum
            if micro + 1 < accum:
                x, y = load(micro + 1)  # load the next batch while the GPU computes
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def main(argv):
    ddp = "RANK" in os.environ  # started by torchrun
    rank, local_rank, world = ((int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
                               if ddp else (0, 0, 1))
    master = rank == 0  # only rank 0 prints, logs and writes checkpoints
    sys.stdout.reconfigure(line_buffering=True)  # progress shows at once through tee or torchrun
    progress.update(argv=argv, rank=rank, ddp=ddp)
    cfg = load_train_config(argv, master)
    device, kind, dtype = pick_device(cfg, local_rank if ddp else None)
    if cfg.gradient_accumulation_steps % world:
        raise ConfigError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} is the "
                          f"total over all ranks and must be a multiple of the "
                          f"{plural(world, 'rank')}")
    accum = cfg.gradient_accumulation_steps // world  # micro-steps per rank
    graphs = use_cuda_graphs(cfg, kind, ddp, accum)
    cfg = dataclasses.replace(cfg, cuda_graphs=graphs)  # what ran, in the checkpoint and the log
    wandb = import_wandb(cfg, master)
    if ddp:
        if kind == "cuda":
            torch.cuda.set_device(device)
        nccl = kind == "cuda" and cfg.backend == "nccl"
        dist.init_process_group(backend="nccl" if nccl else "gloo")
    out_dir = run_folder(cfg)
    cfg = dataclasses.replace(cfg, out_dir=str(out_dir))
    ckpts = Checkpoints(out_dir)
    progress["ckpt"] = ckpts.latest
    if master and not cfg.eval_only:
        check_new_run(cfg, ckpts.latest)
        check_writable(out_dir)
    torch.manual_seed(cfg.seed + rank)  # dropout differs between ranks; the data stream does not
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ctx = nullcontext() if dtype == "float32" else torch.autocast(kind, dtype=getattr(torch, dtype))

    meta, splits = load_data(cfg, master)
    get = lambda split, ix: get_batch(splits[split][0], meta["dtype"], ix, cfg.block_size, device)
    resuming = cfg.init_from == "resume"
    ckpt = load_checkpoint(ckpts.latest) if resuming else None
    model = build_model(cfg, meta, ckpt, ckpts.latest)
    cfg = config_of_model(cfg, model, ckpt)
    model.to(device)
    betas = (cfg.beta1, cfg.beta2)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, betas, kind)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    # Data stream: every rank draws the offsets of the whole step (all micro-steps of all ranks)
    # from one generator seeded alike and takes micro-batches rank, rank + world, ...: the batches
    # depend on seed and step only, not on the number of ranks, and one saved state resumes them.
    train_gen = torch.Generator().manual_seed(cfg.seed)
    iter_num, best_val_loss = 0, math.inf
    if ckpt is not None:
        iter_num, best_val_loss = restore(ckpt, optimizer, scaler, train_gen, cfg, rank, device)
        ckpts.resumed(ckpt)
        progress["ckpt_iter"] = iter_num
        ckpt = None  # free the memory
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if master:
        print(f"{model.get_num_params() / 1e6:.2f}M parameters, attn={cfg.attn}, {device}, "
              f"{dtype}, {tokens_per_iter:,} tokens per iteration ({plural(world, 'rank')} x "
              f"{accum} x {cfg.batch_size} x {cfg.block_size}), writing to {out_dir}")
    if cfg.log_attn_norm:
        model.record_attn_norms(True)  # before compiling: flipping it later recompiles
    raw_model = model
    if cfg.compile:
        if master:
            print("compiling the model: the first step takes longer (--compile=false skips this)")
            if graphs:
                print("each step replays CUDA graphs (--cuda_graphs=false launches its kernels one by one)")
        # static: the larger eval batch must not make training dynamic
        model = torch.compile(model, dynamic=False, mode="reduce-overhead" if graphs else None)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if kind == "cuda" else None)
    eval_model = model.module if ddp else model
    log_path = out_dir / "log.jsonl"
    if master and not cfg.eval_only:
        start_log(log_path, iter_num if resuming else None)
        if not resuming:
            ckpts.best.unlink(missing_ok=True)  # an earlier run's, in the way of this one's
    if wandb:
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=config_to_dict(cfg))

    first_iter = iter_num  # nothing new to save before a step was taken
    nan_watch = NanWatch(device)
    eta, presets = Eta(cfg.max_iters), split_argv(argv)[0] or [default_preset()]
    t0, timed = time.perf_counter(), 0
    while True:
        progress["iter"] = iter_num
        record = {"iter": iter_num}
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only:
            nan_watch.check()
            losses = estimate_loss(eval_model, splits, meta["dtype"], cfg, ctx, device, rank, world)
            record.update(train_loss=losses["train"], val_loss=losses["val"])
            record["copy_loss"] = copy_probe_loss(eval_model, splits["val"], meta["dtype"], cfg, ctx, device)
            if master:
                print(f"iter {iter_num}: train loss {losses['train']:.4f}, "
                      f"val loss {losses['val']:.4f}, copy loss {record['copy_loss']:.4f}")
            nan_watch.check(losses, iter_num)  # before anything is saved
            improved = losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val"])
            at_end = iter_num >= cfg.max_iters
            if iter_num > first_iter and not cfg.eval_only and (
                    improved or cfg.always_save_checkpoint or at_end):
                rng = rng_states(device, train_gen)  # every rank takes part
                with stops_wait_for_the_save():
                    if master:
                        ckpts.save(training_state(raw_model, optimizer, scaler, cfg, meta, rng),
                                   iter_num, losses["val"], best_val_loss, improved)
                    progress["ckpt_iter"] = iter_num
            t0, timed = time.perf_counter(), 0  # the timing below leaves evaluations out
        if cfg.eval_only or iter_num >= cfg.max_iters:
            if master and not cfg.eval_only and len(record) > 1:
                append_log(log_path, record)
            break

        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ix = torch.randint(splits["train"][1] - cfg.block_size,
                           (cfg.gradient_accumulation_steps, cfg.batch_size),
                           generator=train_gen)[rank::world]  # (accum, B): this rank's batches
        loss_sum = train_step(model, optimizer, scaler, lambda k: get("train", ix[k]), accum,
                              cfg.grad_clip, ctx, ddp, graphs)
        nan_watch.step(loss_sum, iter_num)
        timed += 1
        eta.step_done(iter_num)
        if master and kind == "cpu" and iter_num == first_iter + 3:  # after 3 timed steps
            if warning := slow_cpu_warning(eta.left(iter_num), presets):
                print(warning)

        if iter_num % cfg.log_interval == 0 or len(record) > 1:
            nan_watch.check()
            if ddp:
                dist.all_reduce(loss_sum)
            loss = loss_sum.item() / world  # the host waits for the device here, at log steps only
            dt = (time.perf_counter() - t0) / timed
            record.update(loss=loss, lr=lr, ms_per_iter=dt * 1000,
                          tokens_per_s=tokens_per_iter / dt,
                          mfu=raw_model.estimate_mfu(cfg.batch_size * accum, dt))
            if cfg.log_attn_norm:
                record["attn_out_norm"] = raw_model.attn_out_norms()
            if master:
                print(log_line(record, cfg.max_iters, eta))
                append_log(log_path, record)
                if wandb:
                    wandb.log(record)
            t0, timed = time.perf_counter(), 0
        iter_num += 1

    if master:
        print(ckpts.report(best_val_loss, cfg.eval_only))
        if cfg.sample_tokens > 0:
            print_sample(raw_model, meta, cfg.sample_tokens, device, ctx)
    if wandb:
        wandb.finish()
    if ddp:
        dist.destroy_process_group()


def finish(message, code, every_rank=True):
    """Print one line and exit. Under DDP leave at once with os._exit: a clean exit would wait for
    ranks stuck in a collective; torchrun then stops the others."""
    if every_rank or progress["rank"] == 0:
        where = f"[rank {progress['rank']}] " if progress["ddp"] else ""
        print(where + message, file=sys.stderr, flush=True)
    if progress["ddp"]:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def run(argv):
    """main with the exits a user sees: one line and a status for each kind of failure."""
    try:
        main(argv)
    except KeyboardInterrupt:
        if progress["ckpt_iter"] is None:
            finish(f"interrupted at iter {progress['iter']}; no checkpoint was written", 130,
                   every_rank=False)
        resume = shlex.join(["python", "train.py", *progress["argv"], "--init_from=resume"])
        finish(f"interrupted at iter {progress['iter']}; the last good checkpoint is "
               f"{progress['ckpt']} (iter {progress['ckpt_iter']}): resume with {resume}", 130,
               every_rank=False)
    except ConfigError as e:  # the same on every rank: said once
        finish(f"error: {e}", 2, every_rank=False)
    except (TrainError, DataError, ModelLoadError) as e:
        finish(f"error: {e}", 1)
    except Exception:
        if not progress["ddp"]:
            raise
        finish(traceback.format_exc().rstrip(), 1)


def stop_as_ctrl_c(signum, frame):
    """Ctrl-C and a kill raise KeyboardInterrupt, which run() turns into the resume command. Another
    one within 5 s is ignored, so that the message gets out (a kill of tools/ablate.py's process
    group reaches each run twice: from the kill, then as ablate.py's SIGTERM); a later one raises
    again, for a stop that hangs."""
    if progress["stopped_at"] is not None and time.monotonic() - progress["stopped_at"] < 5:
        return
    progress["stopped_at"] = time.monotonic()
    if progress["saving"] and not progress["stop_after_save"]:  # raised once the save is done (a second
        progress["stop_after_save"] = True  # one, 5 s on, raises now: a save that hangs)
        return
    raise KeyboardInterrupt


@contextmanager
def stops_wait_for_the_save():
    """A stop that comes while a checkpoint is written takes effect once ckpt.pt, best.pt and the
    resume line's iteration all name the new save, not between the rename and the rest."""
    progress["saving"] = True
    try:
        yield
    finally:
        progress["saving"] = False
        stop, progress["stop_after_save"] = progress["stop_after_save"], False
    if stop:
        progress["stopped_at"] = time.monotonic()  # the 5 s that let the resume line out start now
        raise KeyboardInterrupt


if __name__ == "__main__":
    # Ctrl-C stops a run with the resume command, even when a shell started it with SIGINT ignored,
    # as it does a background job of a script. So do a kill (SIGTERM: `kill`, `timeout`, a job
    # scheduler's stop, tools/ablate.py's stop) and a closed terminal (SIGHUP, unless nohup ignores
    # it), which would end it without a word; not under torchrun, which sends SIGTERM to stop the
    # ranks once one has failed: a rank waiting in a collective would not take it before a SIGKILL.
    signal.signal(signal.SIGINT, stop_as_ctrl_c)
    if "RANK" not in os.environ:
        signal.signal(signal.SIGTERM, stop_as_ctrl_c)
        if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
            signal.signal(signal.SIGHUP, stop_as_ctrl_c)
    run(sys.argv[1:])
