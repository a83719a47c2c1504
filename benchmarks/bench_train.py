"""Training speed on synthetic tokens: softmax vs sigmoid attention, torch.compile on and off.

    python benchmarks/bench_train.py presets/gpt2_124m.toml --batch_size=12
    python benchmarks/bench_train.py presets/gpt2_124m.toml --block_size=4096 --batch_size=3 --variants=softmax:1,sigmoid:1

Model keys come from the presets and --key=value overrides, as train.py takes them. Each variant
(attn:compile) builds the model, runs --warmup steps (compilation happens there), then times
--iters full steps (forward, backward, fused AdamW) of batch_size x block_size random tokens in
bf16 autocast. Prints ms/iter, tokens/s, MFU, peak memory and each row's tokens/s over the first row's.
--profile also prints, per variant, the GPU kernels that took the most time over 5 steps, and the
GPU's busy time against the step time (a step much longer than its kernels is launch-bound).
"""
import argparse
import datetime
import sys
from pathlib import Path
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: flash_sigmoid.py, model.py
from configurable import TrainConfig, parse_args  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def bench_variant(cfg, attn, compile, iters, warmup, profile=False, vocab_size=50257):
    torch.manual_seed(0)
    cfg.attn = attn
    model = GPT(GPTConfig.from_train_config(cfg, vocab_size)).cuda()
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cuda")
    step_model = torch.compile(model) if compile else model
    x = torch.randint(vocab_size, (cfg.batch_size, cfg.block_size), device="cuda")
    y = torch.randint(vocab_size, (cfg.batch_size, cfg.block_size), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / iters
    tokens = cfg.batch_size * cfg.block_size
    mfu = model.estimate_mfu(cfg.batch_size, dt)
    if profile:
        print_profile(step, dt, f"{attn} compile={compile}")
    return dict(attn=attn, compile=compile, ms=dt * 1e3, tok_s=tokens / dt, mfu=mfu,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--variants", default="softmax:1,sigmoid:1,softmax:0,sigmoid:0",
                   help="comma-separated attn:compile pairs")
    p.add_argument("--out", default="", help="append the markdown table to this file")
    p.add_argument("--profile", action="store_true", help="print each variant's costliest GPU kernels")
    args, rest = p.parse_known_args()
    cfg = parse_args(rest, TrainConfig, prog="benchmarks/bench_train.py")
    if not torch.cuda.is_available():
        sys.exit("error: bench_train.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for variant in args.variants.split(","):
        attn, compile = variant.split(":")
        rows.append(bench_variant(cfg, attn, compile == "1", args.iters, args.warmup, args.profile))
        r = rows[-1]
        print(f"{attn:8} compile={r['compile']!s:5} {r['ms']:8.1f} ms/iter {r['tok_s']:10,.0f} tok/s "
              f"mfu {format_mfu(r['mfu'])} peak {r['peak_gib']:.1f} GiB", flush=True)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    model_desc = f"{cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, block {cfg.block_size}, batch {cfg.batch_size}"
    lines = [f"### {torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}: {model_desc}", "",
             f"Command: `python benchmarks/bench_train.py {' '.join(sys.argv[1:])}`", "",
             "| attn | compile | ms/iter | tokens/s | MFU | peak GiB | tokens/s vs first row |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['attn']} | {'on' if r['compile'] else 'off'} | {r['ms']:.1f} | {r['tok_s']:,.0f} | {format_mfu(r['mfu'])} | "
                     f"{r['peak_gib']:.1f} | {r['tok_s'] / rows[0]['tok_s']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
