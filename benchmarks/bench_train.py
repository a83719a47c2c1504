"""Training speed on synthetic tokens: softmax vs sigmoid attention, torch.compile on and off.

    python benchmarks/bench_train.py presets/gpt2_124m.toml --batch_size=12
    python benchmarks/bench_train.py presets/gpt2_124m.toml --block_size=4096 --batch_size=3 --variants=softmax:1,sigmoid:1
    # GPT-2 124M: the plain and the chunked loss, at batch 12 and at the largest batch that fits
    python benchmarks/bench_train.py presets/gpt2_124m.toml --variants=softmax:1,sigmoid:1 --losses=plain,chunked --largest_batch
    # GPT-2 124M as its preset trains on one GPU: 40 micro-steps a step, so AdamW runs once in 40
    python benchmarks/bench_train.py presets/gpt2_124m.toml --variants=softmax:1,sigmoid:1 --grad_accum=40 --iters=3 --warmup=1
    # the baby GPT as train.py runs it: the character vocabulary, each step replayed as CUDA graphs
    python benchmarks/bench_train.py presets/tinyshakespeare_char.toml --variants=softmax:1,sigmoid:1 --vocab_size=65 --cuda_graphs

Model keys come from the presets and --key=value overrides, as train.py takes them (--dropout=0.1
measures with dropout). Each kind gets its defaults, so sigmoid also has hybrid norm and LayerScale;
--hybrid_norm=false --layerscale=false times the two kinds on the same blocks. Each variant (attn:compile) and loss (--losses: chunked = model.py's
linear_cross_entropy, plain = F.cross_entropy on all the logits) builds the model, runs --warmup
steps (compilation happens there), then times --iters full steps (forward, backward, fused AdamW)
of batch_size x block_size random tokens in bf16 autocast; with --grad_accum=N a step adds N
micro-steps' gradients before AdamW, and the times are a micro-step's share. --largest_batch adds, per row, a row at
the largest batch its peak memory leaves room for (90% of the GPU's memory; smaller on running out).
Prints ms/iter, tokens/s, MFU, peak memory, the host syncs one step makes (0: the CPU runs ahead of
the GPU), and each row's tokens/s over the first row's.
--cuda_graphs compiles with mode="reduce-overhead" (train.py's default in one process without gradient
accumulation; its rows say "graphs"); --vocab_size sets the synthetic tokens' vocabulary (GPT-2's by
default, so a character preset's head is timed 770x too large unless given 65). With --cuda_graphs the peak
memory column reads low: the graphs' private memory pool is not counted.
--profile also prints, per variant, the GPU kernels that took the most time over 5 steps (with
--grad_accum=N over 5 // N whole steps, at least one), and the GPU's busy time against a whole
step's time (a step much longer than its kernels is launch-bound).
"""
import argparse
import dataclasses
import datetime
import gc
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: flash_sigmoid.py, model.py
from configurable import TrainConfig, parse_args  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def bench_variant(cfg, attn, compile, loss_kind, iters, warmup, profile=False, vocab_size=50257, cuda_graphs=False,
                  accum=1):
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, attn=attn)
    model = GPT(GPTConfig.from_train_config(cfg, vocab_size)).cuda()
    model.chunked_loss = loss_kind == "chunked"
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cuda")
    # reduce-overhead: the compiled graphs replayed as CUDA graphs, so no kernel launch costs host time
    step_model = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None) if compile else model
    x = torch.randint(vocab_size, (cfg.batch_size, cfg.block_size), device="cuda")
    y = torch.randint(vocab_size, (cfg.batch_size, cfg.block_size), device="cuda")

    def step():
        for _ in range(accum):  # micro-steps adding their gradients, as train.py's gradient accumulation
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = step_model(x, y)
            (loss / accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    syncs = count_host_syncs(step)
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()  # weights and optimizer state: what a larger batch doesn't grow
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / (iters * accum)  # a micro-step's share of the time
    tokens = cfg.batch_size * cfg.block_size
    mfu = model.estimate_mfu(cfg.batch_size, dt)
    compiled = "graphs" if compile and cuda_graphs else "on" if compile else "off"
    if profile:
        # step() is one optimizer step of accum micro-steps: profile a few whole steps, timed as such
        print_profile(step, dt * accum, f"{attn} compile={compiled}", steps=max(1, 5 // accum))
    return dict(attn=attn, compile=compiled, loss=loss_kind, batch=cfg.batch_size, ms=dt * 1e3, tok_s=tokens / dt,
                mfu=mfu, peak=torch.cuda.max_memory_allocated(), resident=resident, syncs=syncs)


def count_host_syncs(step):
    """How many times one step makes the host wait for the GPU (.item(), a device-to-host copy...)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def largest_batch(cfg, row, *bench_args):
    """The row's variant at the largest batch that fits: estimated from its memory per sequence, then
    85% of that until a run doesn't run out of memory."""
    per_sequence = (row["peak"] - row["resident"]) / row["batch"]
    batch = int((0.9 * torch.cuda.mem_get_info()[1] - row["resident"]) / per_sequence)
    while batch > row["batch"]:
        try:
            return bench_variant(dataclasses.replace(cfg, batch_size=batch), *bench_args)
        except torch.OutOfMemoryError:
            pass
        free_memory()  # outside the except block: the traceback no longer holds the model
        batch = int(batch * 0.85)
    return None


def free_memory():
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def print_profile(step, dt, name, steps=5):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # the GPU's own rows, not the ops that launch them
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / steps  # microseconds -> ms per step
    print(f"## profile {name}: GPU busy {busy_ms:.1f} ms of a {dt * 1e3:.1f} ms step")
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))


def format_mfu(mfu):
    return "n/a" if mfu is None else f"{100 * mfu:.1f}%"


def print_row(r):
    print(f"{r['attn']:8} compile={r['compile']!s:5} loss={r['loss']:7} batch {r['batch']:3} {r['ms']:8.1f} ms/iter "
          f"{r['tok_s']:10,.0f} tok/s mfu {format_mfu(r['mfu'])} peak {r['peak'] / 2**30:.1f} GiB "
          f"host syncs/step {r['syncs']}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--variants", default="softmax:1,sigmoid:1,softmax:0,sigmoid:0",
                   help="comma-separated attn:compile pairs")
    p.add_argument("--losses", default="chunked", help="comma-separated: chunked, plain")
    p.add_argument("--largest_batch", action="store_true", help="also run each row at the largest batch that fits")
    p.add_argument("--out", default="", help="append the markdown table to this file")
    p.add_argument("--profile", action="store_true", help="print each variant's costliest GPU kernels")
    p.add_argument("--cuda_graphs", action="store_true",
                   help="compile with mode=reduce-overhead: each step replays CUDA graphs (compiled variants only)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step (train.py's "
                   "--gradient_accumulation_steps: the GPT-2 preset's 40 on one GPU); times are per micro-step, "
                   "--iters and --warmup count optimizer steps")
    p.add_argument("--vocab_size", type=int, default=50257,
                   help="the synthetic tokens' vocabulary (GPT-2's by default; 65 for the character presets)")
    args, rest = p.parse_known_args()
    cfg = parse_args(rest, TrainConfig, prog="benchmarks/bench_train.py")
    losses = args.losses.split(",")
    if not set(losses) <= {"chunked", "plain"}:
        sys.exit(f"error: --losses takes chunked and/or plain, got {args.losses!r}")
    if args.vocab_size < 1:
        sys.exit(f"error: --vocab_size must be at least 1 (65 for the character presets), got {args.vocab_size}")
    if args.grad_accum < 1:
        sys.exit(f"error: --grad_accum must be at least 1 (micro-steps per optimizer step), got {args.grad_accum}")
    if args.grad_accum > 1 and args.cuda_graphs:
        sys.exit("error: --cuda_graphs replays each micro-step's graph over the last one's gradients, as train.py "
                 "refuses too: drop one of --grad_accum and --cuda_graphs")
    if args.largest_batch and args.cuda_graphs:
        sys.exit("error: --largest_batch sizes batches by peak memory, which --cuda_graphs does not count "
                 "(the graphs' own pool): drop one of them")
    if not torch.cuda.is_available():
        sys.exit("error: bench_train.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for loss_kind in losses:
        for variant in args.variants.split(","):
            attn, compile = variant.split(":")
            rows.append(bench_variant(cfg, attn, compile == "1", loss_kind, args.iters, args.warmup, args.profile,
                                      args.vocab_size, args.cuda_graphs, args.grad_accum))
            print_row(rows[-1])
            free_memory()
    for row in list(rows) if args.largest_batch else []:
        big = largest_batch(cfg, row, row["attn"], row["compile"] != "off", row["loss"], args.iters, args.warmup,
                            False, args.vocab_size, args.cuda_graphs, args.grad_accum)
        if big:
            rows.append(big)
            print_row(big)
        free_memory()
    model_desc = (f"{cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, block {cfg.block_size}, "
                  f"dropout {cfg.dropout}, vocabulary {args.vocab_size}, {args.grad_accum} micro-steps a step")
    lines = [f"### {torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}: {model_desc}", "",
             f"Command: `python benchmarks/bench_train.py {' '.join(sys.argv[1:])}`", "",
             "| attn | compile | loss | batch | ms/iter | tokens/s | MFU | peak GiB | host syncs/step | tokens/s vs first row |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['attn']} | {r['compile']} | {r['loss']} | {r['batch']} | {r['ms']:.1f} | "
                     f"{r['tok_s']:,.0f} | {format_mfu(r['mfu'])} | {r['peak'] / 2**30:.1f} | {r['syncs']} | "
                     f"{r['tok_s'] / rows[0]['tok_s']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")

if __name__ == "__main__":
    main()
