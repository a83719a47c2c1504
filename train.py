"""
Train a GPT with softmax or sigmoid attention on one CPU or GPU, or on several GPUs with DDP.

    python train.py                                    # shakespeare_char: the GPU preset, or the CPU one without a GPU
    python train.py presets/shakespeare_char.toml --attn=sigmoid --max_iters=2000
    python train.py presets/shakespeare_char.toml --init_from=resume   # continue out_dir's ckpt.pt exactly
    python train.py --help                             # every config key, with its type, default and help
    torchrun --standalone --nproc_per_node=8 train.py presets/gpt2_124m.toml      # DDP on one node
    # DDP on 2 nodes: run on both, with --node_rank=0 on the node whose address is master_addr
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 train.py ...
    # (NCCL_IB_DISABLE=1 in front if the nodes have no InfiniBand)

out_dir gets ckpt.pt (written atomically at evals where val loss improves, at every eval with
always_save_checkpoint, and at the end) and log.jsonl (one JSON object per log step). A resumed run
restores the model, optimizer, RNG states and the position of the data stream, so on CPU it is
bit-identical to a run that was never stopped. Exit status: 0 done, 1 error, 2 bad config, 130 Ctrl-C.
"""
import dataclasses
import json
import math
import os
import shlex
import sys
import time
import traceback
from contextlib import nullcontext, suppress
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from attention import check_attention_config
from configurable import ConfigError, TrainConfig, config_to_dict, load_config, parse_args, split_argv
from model import GPT, GPTConfig, ModelLoadError, load_checkpoint_file, resolve_device
from prepare_data import DataError, check_bin, load_meta, prepare, tokenizer_from_meta

HERE = Path(__file__).resolve().parent
NOT_YET = 2**62  # the on-device "first iteration with a non-finite loss" before there is one
RESUME_MAY_CHANGE = ("dropout", "sigmoid_backend")  # model keys that leave the weights as they are
GPT2_SHAPE = ("n_layer", "n_head", "n_kv_head", "n_embd", "bias", "pos_emb", "qk_norm")  # set by the weights for init_from=gpt2*
# what the error handlers at the bottom report: where the run is and where its last checkpoint is
progress = dict(argv=[], rank=0, ddp=False, iter=0, ckpt="out/ckpt.pt", ckpt_iter=None)


class TrainError(Exception):
    """A problem during the run that the user can act on; the message is one line."""


def load_train_config(argv, master):
    """The command line -> a checked TrainConfig; raises ConfigError."""
    if "-h" in argv or "--help" in argv:
        parse_args(argv, TrainConfig, "train.py", "Train a GPT with softmax or sigmoid attention.")  # exits
    presets, _ = split_argv(argv)
    default = "presets/shakespeare_char.toml" if torch.cuda.is_available() else "presets/shakespeare_char_cpu.toml"
    if not presets and master:
        print(f"no preset given: using {default}")
    cfg = load_config(argv, TrainConfig, default_presets=[str(HERE / default)])
    for key in ("n_layer", "n_head", "n_embd", "batch_size", "block_size", "gradient_accumulation_steps",
                "eval_interval", "log_interval", "eval_iters"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("max_iters", "warmup_iters", "sample_tokens", "grad_clip", "min_lr", "weight_decay"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key} must be 0 or more, got {getattr(cfg, key)}")
    for key in ("dropout", "beta1", "beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be at least 0 and below 1, got {getattr(cfg, key)}")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"--learning_rate must be more than 0, got {cfg.learning_rate}")
    check_attention_config(cfg)
    return cfg


def pick_device(cfg, local_rank):
    """(device, device type, dtype name) from --device, --dtype and the hardware; raises ConfigError."""
    device, kind = resolve_device(cfg.device)
    if kind == "cuda" and local_rank is not None:
        device = f"cuda:{local_rank}"  # DDP: one GPU per rank
    bf16 = kind == "cuda" and torch.cuda.is_bf16_supported()
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if bf16 else "float16") if kind == "cuda" else "float32"
    if dtype == "bfloat16" and kind == "cuda" and not bf16:
        raise ConfigError(f"--dtype=bfloat16 but {torch.cuda.get_device_name()} lacks bfloat16: use --dtype=float16 or auto")
    if dtype == "float16" and kind != "cuda":
        raise ConfigError(f"--dtype=float16 is for CUDA GPUs (it needs a GradScaler): use float32 or bfloat16 on {kind}")
    return device, kind, dtype


def check_writable(out_dir):
    """Fail before training, not at the first checkpoint, when out_dir can't be written."""
    probe = out_dir / ".write_test"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(bytes(4096))
        probe.unlink()
    except OSError as e:
        raise TrainError(f"cannot write to --out_dir={out_dir} ({e.strerror or e}): choose a folder you can write to") from None


def load_data(cfg, master):
    """meta.json and {split: (token file, token count)}; shakespeare_char is prepared when missing."""
    folder = Path(cfg.data_dir) / cfg.dataset
    if master and cfg.dataset == "shakespeare_char" and not (folder / "meta.json").exists():
        print(f"{folder} not found: preparing it, as python prepare_data.py would")
        prepare("shakespeare_char", cfg.data_dir)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait while rank 0 prepares the data
    meta = load_meta(folder)
    splits = {}
    for split in ("train", "val"):
        tokens = check_bin(folder, meta, split)
        if len(tokens) <= cfg.block_size:
            raise TrainError(f"{tokens.filename} has {len(tokens)} tokens, too few for block_size={cfg.block_size}: "
                             f"use a smaller --block_size or more text")
        splits[split] = (tokens.filename, len(tokens))
    return meta, splits


def get_batch(path, dtype, ix, block_size, device):
    """Inputs x and targets y (B, T) starting at token offsets ix (B,); y is x shifted by one token."""
    data = np.memmap(path, dtype=dtype, mode="r")  # re-opened per batch: a kept memmap leaks memory (nanoGPT)
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix.tolist()]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix.tolist()]).astype(np.int64))
    if device.startswith("cuda"):  # pinned memory: the copy to the GPU runs while the host moves on
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT); not tied to max_iters,
    so a run stopped early and resumed follows the same schedule."""
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
                         f"point --out_dir at the run to resume, or start one with --init_from=scratch")
    try:
        ckpt = load_checkpoint_file(path)
    except ModelLoadError as e:
        raise TrainError(str(e)) from None
    missing = [k for k in ("model", "optimizer", "model_args", "dataset_meta", "iter_num", "best_val_loss", "rng")
               if k not in ckpt] if isinstance(ckpt, dict) else ["everything"]
    if missing:
        raise TrainError(f"{path} lacks {', '.join(missing)}: it was not written by train.py, so it can't be resumed")
    return ckpt


def check_resumable(cfg, meta, ckpt, path):
    """One line naming what differs when the checkpoint is another model or another dataset."""
    want = dataclasses.asdict(GPTConfig.from_train_config(cfg, meta["vocab_size"]))
    have = ckpt.get("model_args") or {}
    # a GPT-2 finetune is resumed with the command that started it: its shape comes from the checkpoint
    from_gpt2 = str((ckpt.get("config") or {}).get("init_from")).startswith("gpt2")
    skip = RESUME_MAY_CHANGE + ("vocab_size",) + (GPT2_SHAPE if from_gpt2 else ())
    keys = [k for k in want if k not in skip and have.get(k) != want[k]]
    if keys:
        raise TrainError(f"{path} holds another architecture: it has {', '.join(f'{k}={have.get(k)}' for k in keys)}, "
                         f"this run asks for {', '.join(f'{k}={want[k]}' for k in keys)}; "
                         f"pass the settings it was trained with, or use another --out_dir")
    old = ckpt.get("dataset_meta") or {}
    keys = [k for k in ("name", "tokenizer", "vocab_size", "chars") if old.get(k) != meta.get(k)]
    if keys:
        raise TrainError(f"{path} was trained on another dataset ({', '.join(keys)} differ: it used {old.get('name')!r}, "
                         f"{old.get('tokenizer')}, vocab {old.get('vocab_size')}; this run uses {meta['name']!r}, "
                         f"{meta['tokenizer']}, vocab {meta['vocab_size']}): resume with its --dataset, or use another --out_dir")


def build_model(cfg, meta, ckpt, ckpt_path):
    if cfg.init_from == "scratch":
        return GPT(GPTConfig.from_train_config(cfg, meta["vocab_size"]))
    if cfg.init_from == "resume":
        check_resumable(cfg, meta, ckpt, ckpt_path)
        return GPT.from_checkpoint(ckpt, override_args={k: getattr(cfg, k) for k in RESUME_MAY_CHANGE})
    if meta["tokenizer"] != "gpt2":
        raise TrainError(f"--init_from={cfg.init_from} needs a GPT-2-tokenized dataset, but {meta['name']} is "
                         f"{meta['tokenizer']}-level: use e.g. --dataset=shakespeare")
    keys = ("dropout", "block_size", "attn", "sigmoid_bias", "sigmoid_backend", "qk_norm", "layerscale",
            "layerscale_init", "hybrid_norm", "pos_emb", "n_kv_head")  # n_layer, n_head, n_embd come from GPT-2
    return GPT.from_pretrained(cfg.init_from, {k: getattr(cfg, k) for k in keys})


@torch.no_grad()
def estimate_loss(model, splits, dtype, gen, cfg, ctx, device, rank, world):
    """Mean loss over eval_iters batches per split. Offsets come from gen, never the training stream;
    every rank draws them all and evaluates batches rank, rank + world, ..."""
    model.eval()
    out = {}
    for split, (path, n_tokens) in splits.items():
        ix = torch.randint(n_tokens - cfg.block_size, (cfg.eval_iters, cfg.batch_size), generator=gen)
        total = torch.zeros(2, device=device)  # (sum of losses, batches) on this rank
        for k in range(rank, cfg.eval_iters, world):
            x, y = get_batch(path, dtype, ix[k], cfg.block_size, device)
            with ctx:
                _, loss = model(x, y)
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        if world > 1:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


@torch.no_grad()
def copy_probe_loss(model, split, dtype, cfg, ctx, device, n_seqs=64, seed=0):
    """In-context copying: the mean loss on the second half of n_seqs sequences [run, run], each run
    block_size // 2 consecutive training tokens. Only the repeat's tokens after its first are scored:
    a model that can look back block_size // 2 tokens (induction heads) predicts them nearly exactly.
    The runs come from their own generator with a fixed seed: every run on the same data and
    block_size, of either kind and any seed, sees the same probe, and the training and eval streams
    are untouched. Batches of cfg.batch_size rows (the last padded with ignored rows) keep eval's shapes."""
    (path, n_tokens), half = split, cfg.block_size // 2
    ix = torch.randint(n_tokens - half, (n_seqs,), generator=torch.Generator().manual_seed(seed))
    run, _ = get_batch(path, dtype, ix, half, device)  # (n_seqs, half)
    x = torch.cat([run, run], dim=1)  # (n_seqs, 2 * half)
    y = torch.full_like(x, -1)  # -1: not scored (cross_entropy's ignore_index)
    y[:, half:-1] = x[:, half + 1:]  # position half + i predicts run[i + 1]
    pad = -n_seqs % cfg.batch_size
    x, y = torch.cat([x, x.new_zeros(pad, x.size(1))]), torch.cat([y, y.new_full((pad, y.size(1)), -1)])
    model.eval()
    total, count = 0.0, 0
    for k in range(0, len(x), cfg.batch_size):
        yk = y[k:k + cfg.batch_size]
        with ctx:
            _, loss = model(x[k:k + cfg.batch_size], yk)
        n = (yk != -1).sum().item()
        total, count = total + loss.float().item() * n, count + n
    model.train()
    return total / count


def check_finite(bad_iter, bad_loss):
    """Stop, agreeing over all ranks, once a loss was nan or inf: nothing after it gets saved."""
    if dist.is_initialized():
        dist.all_reduce(bad_iter, op=dist.ReduceOp.MIN)
    if bad_iter.item() != NOT_YET:
        raise not_finite(bad_loss.item(), bad_iter.item())


def not_finite(loss, iter_num):
    """The error for a nan or inf loss, a training or an evaluation one."""
    where = (f"the last good checkpoint is {progress['ckpt']} (iter {progress['ckpt_iter']})"
             if progress["ckpt_iter"] is not None else "no checkpoint was written")
    return TrainError(f"loss became {loss} at iter {iter_num}; {where}; "
                      f"try a lower --learning_rate or a longer --warmup_iters")


def rng_states(device):
    """[[cpu state, cuda state?] per rank]: each rank's dropout RNG, gathered for rank 0 to save."""
    mine = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.startswith("cuda") else [])
    if not dist.is_initialized():
        return [mine]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def save_checkpoint(path, ckpt):
    """torch.save to ckpt.pt.tmp, fsync, rename over ckpt.pt: a crash or a full disk leaves the old one."""
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
        raise TrainError(f"could not write {path} ({getattr(e, 'strerror', None) or ' '.join(str(e).split())[:200]}); "
                         f"the previous checkpoint is kept: free some disk space or choose another --out_dir") from None
    finally:
        with suppress(OSError):
            tmp.unlink()


def start_log(path, resume_iter):
    """A new run starts log.jsonl empty; a resumed one keeps the lines from before its checkpoint."""
    keep = []
    if resume_iter is not None and path.exists():
        for line in path.read_text().splitlines():
            with suppress(ValueError, KeyError, TypeError):  # a line cut short by a crash is dropped
                if json.loads(line)["iter"] < resume_iter:
                    keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def print_sample(model, meta, n_tokens, device, ctx):
    encode, decode = tokenizer_from_meta(meta)
    start = "<|endoftext|>" if meta["tokenizer"] == "gpt2" else "\n" if "\n" in meta["chars"] else meta["chars"][0]
    x = torch.tensor([encode(start)], dtype=torch.long, device=device)  # (1, T)
    with ctx:
        y = model.generate(x, n_tokens, temperature=0.8, top_k=200)
    print(f"sample of {n_tokens} tokens:\n{decode(y[0, x.size(1):].tolist())}")


def main(argv):
    ddp = "RANK" in os.environ  # started by torchrun
    rank, local_rank, world = (int(os.environ.get(k, 0)) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    master = rank == 0  # only rank 0 prints, logs and writes checkpoints
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once through tee, nohup or torchrun
    progress.update(argv=argv, rank=rank, ddp=ddp)
    cfg = load_train_config(argv, master)
    device, kind, dtype = pick_device(cfg, local_rank if ddp else None)
    if cfg.gradient_accumulation_steps % world:
        raise ConfigError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} is the total over all ranks "
                          f"and must be a multiple of the {world} ranks")
    accum = cfg.gradient_accumulation_steps // world  # micro-steps per rank
    wandb = None
    if cfg.wandb_log and master:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb_log needs wandb: pip install wandb, or drop --wandb_log") from None
    if ddp:
        if kind == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if kind == "cuda" and cfg.backend == "nccl" else "gloo")
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    progress["ckpt"] = ckpt_path
    if master and not cfg.eval_only:
        check_writable(out_dir)
    torch.manual_seed(cfg.seed + rank)  # dropout differs between ranks; the data stream does not (below)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=kind, dtype=getattr(torch, dtype))

    meta, splits = load_data(cfg, master)
    get = lambda split, ix: get_batch(splits[split][0], meta["dtype"], ix, cfg.block_size, device)
    resuming = cfg.init_from == "resume"
    ckpt = load_checkpoint(ckpt_path) if resuming else None
    model = build_model(cfg, meta, ckpt, ckpt_path)
    # the saved config describes the model actually built (GPT-2's shape for init_from=gpt2*), and a
    # resumed run keeps its checkpoint's init_from: check_resumable reads it to resume a GPT-2 finetune again
    cfg = dataclasses.replace(cfg, **{f.name: getattr(model.config, f.name)
                                      for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"},
                              **({"init_from": (ckpt.get("config") or {}).get("init_from", "resume")} if resuming else {}))
    model.to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), kind)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    # Data stream: every rank draws the offsets of the whole step (all micro-steps of all ranks) from
    # one generator seeded alike and takes micro-batches rank, rank + world, ...: the batches depend
    # on seed and step only, not on the number of ranks, and one saved state resumes them exactly.
    train_gen, eval_gen = torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed + 1)
    iter_num, best_val_loss = 0, math.inf
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # group 0 decays: see configure_optimizers
        for group in optimizer.param_groups:  # this run's settings, not the checkpoint's (lr is set every step)
            group["betas"] = (cfg.beta1, cfg.beta2)
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss, rng = ckpt["iter_num"], ckpt["best_val_loss"], ckpt["rng"]
        if rank < len(rng["torch"]):  # a rank the saving run did not have keeps its fresh seed
            torch.set_rng_state(rng["torch"][rank])
            if kind == "cuda" and rank < len(rng.get("cuda", [])):
                torch.cuda.set_rng_state(rng["cuda"][rank], device)
        train_gen.set_state(rng["train_data"])
        eval_gen.set_state(rng["eval_data"])
        progress["ckpt_iter"] = iter_num
        ckpt = None  # free the memory
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if master:
        print(f"{model.get_num_params() / 1e6:.2f}M parameters, attn={cfg.attn}, {device}, {dtype}, "
              f"{tokens_per_iter:,} tokens per iteration ({world} ranks x {accum} x {cfg.batch_size} x {cfg.block_size})")
    if cfg.log_attn_norm:
        model.record_attn_norms(True)  # before compiling: flipping it later recompiles
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if kind == "cuda" else None)
    eval_model = model.module if ddp else model
    log_path = out_dir / "log.jsonl"
    if master and not cfg.eval_only:
        start_log(log_path, iter_num if resuming else None)
    if wandb:
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=config_to_dict(cfg))

    first_iter = iter_num  # nothing new to save before a step was taken
    bad_iter = torch.tensor(NOT_YET, device=device)  # first iteration whose loss was not finite
    bad_loss = torch.tensor(math.nan, device=device)
    t0, timed = time.perf_counter(), 0
    while True:
        progress["iter"] = iter_num
        record = {"iter": iter_num}
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only:
            check_finite(bad_iter, bad_loss)
            eval_state = eval_gen.get_state()  # saved: a run resumed here repeats this evaluation exactly
            losses = estimate_loss(eval_model, splits, meta["dtype"], eval_gen, cfg, ctx, device, rank, world)
            record.update(train_loss=losses["train"], val_loss=losses["val"])
            record["copy_loss"] = copy_probe_loss(eval_model, splits["train"], meta["dtype"], cfg, ctx, device)
            if master:
                print(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                      f"copy loss {record['copy_loss']:.4f}")
            bad = [loss for loss in losses.values() if not math.isfinite(loss)]
            if bad:  # before anything is saved; the losses are all-reduced, so every rank stops here
                raise not_finite(bad[0], iter_num)
            improved, best_val_loss = losses["val"] < best_val_loss, min(best_val_loss, losses["val"])
            at_end = iter_num >= cfg.max_iters
            if iter_num > first_iter and not cfg.eval_only and (improved or cfg.always_save_checkpoint or at_end):
                rng = rng_states(device)  # every rank takes part
                if master:
                    rng = {"torch": [r[0] for r in rng], **({"cuda": [r[1] for r in rng]} if kind == "cuda" else {}),
                           "train_data": train_gen.get_state(), "eval_data": eval_state}
                    save_checkpoint(ckpt_path, {
                        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "model_args": dataclasses.asdict(raw_model.config), "config": config_to_dict(cfg),
                        "dataset_meta": meta, "iter_num": iter_num, "best_val_loss": best_val_loss, "rng": rng,
                        **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {})})
                    print(f"saved {ckpt_path}")
                progress["ckpt_iter"] = iter_num
            t0, timed = time.perf_counter(), 0  # the timing below leaves evaluations out
        if cfg.eval_only or iter_num >= cfg.max_iters:
            if master and not cfg.eval_only and len(record) > 1:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            break

        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ix = torch.randint(splits["train"][1] - cfg.block_size, (cfg.gradient_accumulation_steps, cfg.batch_size),
                           generator=train_gen)[rank::world]  # (accum, B): this rank's micro-batches
        if os.environ.get("SIGMOID_GPT_FAIL_RANK") == str(rank):  # debug hook: tests that all ranks stop
            raise RuntimeError(f"SIGMOID_GPT_FAIL_RANK={rank}: failing on purpose")
        x, y = get("train", ix[0])
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            # DDP all-reduces the gradients in backward: only after the last micro-step
            with model.no_sync() if ddp and micro < accum - 1 else nullcontext():
                with ctx:
                    _, loss = model(x, y)
                    loss = loss / accum
                if micro + 1 < accum:
                    x, y = get("train", ix[micro + 1])  # load the next batch while the device computes
                loss_sum += loss.detach()
                scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        first_bad = ~loss_sum.isfinite() & (bad_iter == NOT_YET)  # kept on the device: no host sync here
        bad_iter, bad_loss = torch.where(first_bad, iter_num, bad_iter), torch.where(first_bad, loss_sum, bad_loss)
        timed += 1

        if iter_num % cfg.log_interval == 0 or len(record) > 1:
            check_finite(bad_iter, bad_loss)
            if ddp:
                dist.all_reduce(loss_sum)
            loss = loss_sum.item() / world  # the host waits for the device here, at log steps only
            dt = (time.perf_counter() - t0) / timed
            mfu = raw_model.estimate_mfu(cfg.batch_size * accum, dt)
            record.update(loss=loss, lr=lr, ms_per_iter=dt * 1000, tokens_per_s=tokens_per_iter / dt, mfu=mfu)
            if cfg.log_attn_norm:
                record["attn_out_norm"] = raw_model.attn_out_norms()
            if master:
                norms = f", attn out norm {' '.join(f'{n:.3f}' for n in record['attn_out_norm'])}" if cfg.log_attn_norm else ""
                print(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                      f"{tokens_per_iter / dt:,.0f} tok/s, mfu {'n/a' if mfu is None else f'{mfu * 100:.1f}%'}{norms}")
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if wandb:
                    wandb.log(record)
            t0, timed = time.perf_counter(), 0
        iter_num += 1

    if master:
        print(f"best val loss {best_val_loss:.4f}")
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
        print((f"[rank {progress['rank']}] " if progress["ddp"] else "") + message, file=sys.stderr, flush=True)
    if progress["ddp"]:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        if progress["ckpt_iter"] is None:
            finish(f"interrupted at iter {progress['iter']}; no checkpoint was written", 130, every_rank=False)
        resume = shlex.join(["python", "train.py", *progress["argv"], "--init_from=resume"])
        finish(f"interrupted at iter {progress['iter']}; the last good checkpoint is {progress['ckpt']} "
               f"(iter {progress['ckpt_iter']}): resume with {resume}", 130, every_rank=False)
    except ConfigError as e:  # the same on every rank: said once
        finish(f"error: {e}", 2, every_rank=False)
    except (TrainError, DataError, ModelLoadError) as e:
        finish(f"error: {e}", 1)
    except Exception:
        if not progress["ddp"]:
            raise
        finish(traceback.format_exc().rstrip(), 1)
