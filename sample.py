"""Sample from a model trained by train.py.

    python sample.py                      # the newest run folder here, e.g. out-shakespeare-char-cpu-sigmoid
    python sample.py --out_dir=out-shakespeare-char-sigmoid --start="ROMEO:" --num_samples=3
"""
import shlex
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from configurable import ConfigError, opt, parse_args
from model import GPT, ModelLoadError, load_checkpoint_file, resolve_device, resolve_dtype
from prepare_data import DataError, tokenizer_from_meta


@dataclass
class SampleConfig:
    out_dir: str = opt("", "train.py's --out_dir; empty = the newest run folder here")
    checkpoint: str = opt("best", "best = best.pt (lowest val loss) where there is one, else ckpt.pt; "
                                  "latest = ckpt.pt (the last saved)", choices=("best", "latest"))
    start: str = opt("\n", "the prompt, or FILE:path to read it from a file")
    num_samples: int = opt(10, "number of samples to draw")
    max_new_tokens: int = opt(500, "tokens generated per sample")
    temperature: float = opt(0.8, "1.0 = as trained, lower = more predictable, 0 = always the likeliest token")
    top_k: int = opt(200, "sample only among the k likeliest tokens; 0 = all")
    top_p: float = opt(1.0, "sample only among the likeliest tokens whose probabilities add up to p; 1.0 = all")
    seed: int = opt(1337, "random seed")
    device: str = opt("auto", "auto (cuda if there is one, else cpu), cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto = bfloat16 where supported, else float16 on CUDA, float32 on CPU",
                     choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = opt(False, "torch.compile the model's forward (slow first call; helps long runs on GPU)")


def fail(message, code=1):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_config(cfg):
    """The ranges parse_args can't know; raises ConfigError."""
    for key in ("num_samples", "max_new_tokens"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("top_k", "temperature"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key} must be 0 or more, got {getattr(cfg, key)}")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"--top_p must be more than 0 and at most 1 (1.0 = all tokens), got {cfg.top_p}")


def find_checkpoint(out_dir, which):
    """out_dir's best.pt (train.py's lowest val loss) or ckpt.pt (its latest); with no --out_dir,
    the newest run among the folders here (train.py names them after the preset and attention
    kind). Says on stderr which file it picked unless that is out_dir's only checkpoint."""
    names = ("best.pt", "ckpt.pt") if which == "best" else ("ckpt.pt",)
    note = ""
    if out_dir:
        folder = Path(out_dir)
    else:
        runs = sorted({p.parent for name in names for p in Path().glob(f"*/{name}")},
                      key=lambda run: max(p.stat().st_mtime for p in run.glob("*.pt")))
        if not runs:
            fail(f"no run folder with a checkpoint in {Path.cwd()}: train first with python train.py, "
                 f"or give --out_dir")
        folder = runs[-1]
        note = ", the newest run here (--out_dir picks one" + (
            f"; the others: {', '.join(map(str, reversed(runs[:-1])))})" if len(runs) > 1 else ")")
    path = next((folder / name for name in names if (folder / name).is_file()), None)
    if path is None:
        command = shlex.join(["python", "train.py", f"--out_dir={out_dir}"])
        fail(f"no checkpoint at {folder / 'ckpt.pt'}: train first with {command}")
    if path.name == "best.pt":
        note = " (the lowest val loss; --checkpoint=latest reads ckpt.pt)" + note
    if note:
        print(f"sampling from {path}{note}", file=sys.stderr)
    return path


def main(argv=None):
    cfg = parse_args(argv, SampleConfig, prog="sample.py", description="Sample text from a trained checkpoint.")
    try:
        check_config(cfg)
        device, device_type = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device_type)
    except ConfigError as e:  # a config mistake: exit 2, as parse_args does
        fail(e, code=2)
    path = find_checkpoint(cfg.out_dir, cfg.checkpoint)
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
    torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))

    try:
        ckpt = load_checkpoint_file(path, map_location=device)
    except ModelLoadError as e:
        fail(str(e))
    try:  # backend auto: the Triton kernel where it can run, the torch reference elsewhere (same math)
        model = GPT.from_checkpoint(ckpt, override_args=dict(sigmoid_backend="auto"))
    except ModelLoadError as e:
        fail(f"{path}: {e}")
    model.eval().to(device)
    if cfg.compile:
        model.forward = torch.compile(model.forward, dynamic=True)  # generate calls forward with varying lengths
    if not isinstance(ckpt.get("dataset_meta"), dict):
        fail(f"{path} has no dataset_meta, so its tokens can't be decoded: save it with train.py")
    encode, decode = tokenizer_from_meta(ckpt["dataset_meta"])

    start = cfg.start
    if start.startswith("FILE:"):
        try:
            start = Path(start[5:]).read_text(encoding="utf-8")
        except OSError as e:
            fail(f"cannot read the prompt file {start[5:]!r}: {e.strerror}")
    try:
        start_ids = encode(start)
    except DataError as e:
        fail(f"the prompt can't be encoded: {e}; use only characters from the training text")
    if not start_ids:
        fail("the prompt is empty: give --start at least one token (the default is a newline)")
    x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]  # (1, T)

    with torch.no_grad(), ctx:
        for _ in range(cfg.num_samples):
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
            print(decode(y[0].tolist()))
            print("---------------")


if __name__ == "__main__":
    main()
