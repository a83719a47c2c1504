"""Typed, self-documenting config for train.py and sample.py.

A config is a dataclass whose keys are declared with opt(default, help). The command line is
TOML preset files, applied in order, then --key=value overrides:

    python train.py presets/shakespeare_char.toml --attn=sigmoid --max_iters=2000

Unlike nanoGPT's configurator.py, config text is parsed, never executed: each value is checked
against its key's type, and a mistake is one line on stderr saying how to fix it (exit status 2).
"""
import dataclasses
import difflib
import math
import re
import sys
import tomllib
import typing
from dataclasses import dataclass


AutoBool = typing.Optional[bool]  # true, false or auto (None): a default that follows another key, e.g. attn


class ConfigError(ValueError):
    """Bad user input at config time; the message is one line saying how to fix it."""


def opt(default, help, choices=None):
    """Declare a config key: its default, a one-line help and, optionally, the allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = opt("out-{attn}", "folder for checkpoints and logs; {key} becomes that key's value")
    overwrite: bool = opt(False, "let a new run replace a checkpoint of another config in out_dir")
    eval_interval: int = opt(250, "estimate train/val loss every this many steps")
    log_interval: int = opt(10, "print the training loss every this many steps")
    eval_iters: int = opt(200, "batches per loss estimate at most: a split's block_size windows, all if they fit, else evenly spaced")
    eval_only: bool = opt(False, "estimate the loss once and exit")
    always_save_checkpoint: bool = opt(False, "save at every eval, not only when val loss improves (always saved at the end)")
    init_from: str = opt("scratch", "start from a new model, out_dir's checkpoint, or OpenAI GPT-2 weights",
                         choices=("scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"))
    wandb_log: bool = opt(False, "log to Weights & Biases")
    wandb_project: str = opt("sigmoid-gpt", "W&B project")
    wandb_run_name: str = opt("run", "W&B run name")
    sample_tokens: int = opt(300, "tokens to generate and print at the end of training; 0 = none")
    # data
    dataset: str = opt("shakespeare_char", "dataset name: a subfolder of data_dir made by prepare_data.py")
    data_dir: str = opt("data", "folder holding one subfolder per dataset")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step, in total over all ranks")
    batch_size: int = opt(64, "sequences per micro-batch")
    block_size: int = opt(256, "context length in tokens")
    # model
    n_layer: int = opt(6, "transformer blocks")
    n_head: int = opt(6, "query heads per attention layer")
    n_kv_head: int = opt(0, "key/value heads; 0 = same as n_head, fewer = grouped-query attention")
    n_embd: int = opt(384, "embedding width")
    dropout: float = opt(0.2, "dropout probability (embeddings, residual branches and attention weights, softmax and sigmoid alike); 0.0 for pretraining, 0.1+ for finetuning")
    bias: bool = opt(False, "bias in Linear and LayerNorm layers (GPT-2 has them)")
    # attention
    attn: str = opt("softmax", "attention kind; the default sigmoid is the paper's recipe (Ramapuram et al. 2024) with a "
                               "sparser start: sigmoid(QK^T/sqrt(d) + b)V with b = -log(block_size) - 4, QK-norm, RoPE, "
                               "hybrid norm and LayerScale 0.1, which matched or beat softmax at blocks 64, 256 and 4096 "
                               "and at 1024 on characters, and trails on a small BPE split at 1024; softmax gets the same QK-norm and RoPE, and no hybrid norm or "
                               "LayerScale, which made it worse",
                    choices=("softmax", "sigmoid"))
    sigmoid_bias: str = opt("auto", "sigmoid attention bias b: auto = -log_n-4 with hybrid norm, else -log_n; -log_n-C = "
                                    "-log(block_size) - C; learnable = one learned bias per head starting at auto's; "
                                    "or a number like -5.5")
    sigmoid_backend: str = opt("auto", "sigmoid attention implementation; auto = Triton kernel on CUDA, else torch",
                               choices=("auto", "triton", "torch"))
    qk_norm: bool = opt(True, "normalise queries and keys before their dot product (both kinds): bounds sigmoid's early "
                              "scores, the paper's recipe; false for nanoGPT/GPT-2")
    qk_scale: str = opt("fixed", "scores q.k/sqrt(head_dim) as they are (fixed) or times a learned per-head factor "
                                 "starting at 1 (learnable), which lifts QK-norm's ceiling of sqrt(head_dim)",
                        choices=("fixed", "learnable"))
    layerscale: AutoBool = opt(None, "scale each residual branch by a learned per-channel factor; auto = on for sigmoid, "
                                     "off for softmax")
    layerscale_init: float = opt(0.1, "initial LayerScale factor")
    hybrid_norm: AutoBool = opt(None, "also normalise each attention output before the residual add; auto = on for "
                                      "sigmoid, off for softmax")
    pos_emb: str = opt("rope", "position information (both kinds); rope helps both at block 1024 and sigmoid at 256; "
                               "learned is nanoGPT/GPT-2's", choices=("learned", "rope", "alibi"))
    log_attn_norm: bool = opt(False, "log the mean L2 norm of each layer's attention output at log steps")
    # optimizer: AdamW with linear warmup then cosine decay to min_lr
    learning_rate: float = opt(1e-3, "peak learning rate")
    max_iters: int = opt(5000, "optimizer steps in total")
    weight_decay: float = opt(0.1, "AdamW weight decay (2D weights only)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the gradient norm to this; 0.0 = no clipping")
    decay_lr: bool = opt(True, "decay the learning rate; false = constant after warmup")
    warmup_iters: int = opt(100, "linear warmup steps")
    lr_decay_iters: int = opt(5000, "step where the cosine decay reaches min_lr; about max_iters per Chinchilla")
    min_lr: float = opt(1e-4, "final learning rate; about learning_rate / 10 per Chinchilla")
    # system
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto = bfloat16 where supported, else float16 on CUDA, float32 on CPU",
                     choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = opt(True, "torch.compile the model")
    cuda_graphs: AutoBool = opt(None, "with compile on a CUDA GPU, replay each compiled step as CUDA graphs "
                                "(mode=reduce-overhead): kernels cost no host time; auto = on in one process without "
                                "gradient accumulation, off otherwise")
    seed: int = opt(1337, "random seed; each rank adds its rank for dropout (the data stream is the same on every rank)")
    backend: str = opt("nccl", "DDP backend; gloo is forced on CPU", choices=("nccl", "gloo"))


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
_EXPECTS = {int: "an int", float: "a float", bool: "true or false", str: "a string", AutoBool: "true, false or auto"}
_NAMES = {AutoBool: "bool|auto"}


def _keys(config_cls):
    """{name: (type, choices)} for every key of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(config_cls)  # resolves annotations written as strings
    for f in dataclasses.fields(config_cls):
        if hints[f.name] not in _EXPECTS:
            raise TypeError(f"{config_cls.__name__}.{f.name}: a config key must be an int, float, bool, AutoBool or str")
    return {f.name: (hints[f.name], f.metadata.get("choices")) for f in dataclasses.fields(config_cls)}


def _convert(label, typ, choices, value):
    """Check one value against its key's type. Text (the command line, a quoted TOML string) is
    parsed; any other value must have the type already, except that an int is fine for a float."""
    fail = ConfigError(f"{label} expects {_EXPECTS[typ]}, got {value!r}")
    if typ == AutoBool:
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return None
        typ = bool
    if isinstance(value, str) and typ is not str:
        text = value.strip().lower()
        if typ is bool and text not in _BOOLS:
            raise fail
        try:
            value = _BOOLS[text] if typ is bool else typ(text)
        except ValueError:
            raise fail from None
    elif typ is float and type(value) is int:
        value = float(value)
    if type(value) is not typ:  # not isinstance: a bool is an int to Python but not to us
        if typ is str and type(value) in (int, float):
            raise ConfigError(f"{label} expects a string, got {value!r}; write it in quotes")
        raise fail
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"{label} expects a finite float, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"{label} expects one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def _check(pairs, config_cls, where="", dash=""):
    """Check (key, value) pairs against config_cls; `where` and `dash` say where they came from."""
    keys, out = _keys(config_cls), {}
    for key, value in pairs:
        name = str(key).replace("-", "_")
        if name not in keys:
            close = difflib.get_close_matches(name, keys, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see --help for the list of keys"
            raise ConfigError(f"{where}unknown config key {name!r}; {hint}")
        out[name] = _convert(f"{where}{dash}{name}", *keys[name], value)
    return out


def _toml_error(path, error):
    """TOML's message, plus the fix for the likeliest slip: a string value without quotes."""
    message = f"{path} is not valid TOML: {' '.join(str(error).split())}"
    at = re.search(r"at line (\d+)", str(error))
    if str(error).startswith("Invalid value") and at:
        with open(path, encoding="utf-8", errors="replace") as f:
            line = f.read().splitlines()[int(at.group(1)) - 1]
        bare = re.fullmatch(r"\s*([\w-]+)\s*=\s*([^\s#\"']+)\s*(#.*)?", line)
        if bare:
            key, value = bare.group(1), bare.group(2)
            message += f"; a string needs quotes: {key} = \"{value}\""
    return message


def load_preset(path, config_cls=TrainConfig):
    """Read one TOML preset, a flat table of key = value, into {key: checked value}."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"preset file {path!r} not found") from None
    except OSError as e:
        raise ConfigError(f"cannot read preset file {path!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_toml_error(path, e)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {' '.join(str(e).split())}") from None
    for key, value in table.items():
        if isinstance(value, dict):
            raise ConfigError(f"{path}: presets are flat key = value lines; remove the [{key}] table header")
    return _check(table.items(), config_cls, where=f"{path}: ")


def split_argv(argv, config_cls=TrainConfig):
    """Split argv into preset paths (*.toml) and (key, text) overrides, both in order.
    `--key=value` and `--key value` both work; a bare bool key (`--compile`) means true."""
    keys, presets, overrides = _keys(config_cls), [], []
    i = 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        nxt = argv[i] if i < len(argv) else None
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if eq:
                pass
            elif keys.get(key, (None,))[0] in (bool, AutoBool):
                value = "true"
                if nxt is not None and nxt.strip().lower() in _BOOLS:
                    value, i = nxt, i + 1
            elif nxt is not None and not nxt.startswith("--"):
                value, i = nxt, i + 1
            elif key in keys:
                raise ConfigError(f"--{key} needs a value: --{key}=<{_type_name(keys[key][0])}>")
            overrides.append((key, value))  # an unknown key is reported when the value is checked
        elif arg.endswith(".toml"):
            presets.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: give presets as *.toml files and overrides as --key=value")
    return presets, overrides


def load_config(argv, config_cls=TrainConfig, default_presets=()):
    """parse_args without printing or exiting: raises ConfigError."""
    presets, overrides = split_argv(list(argv), config_cls)
    values = {}
    for path in presets or default_presets:  # the defaults only when the user named no preset
        values.update(load_preset(path, config_cls))
    values.update(_check(overrides, config_cls, dash="--"))
    return config_cls(**values)


def _type_name(typ):
    return _NAMES.get(typ, getattr(typ, "__name__", str(typ)))


def _show(value):
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and (value == "" or value != value.strip() or "\n" in value):
        return repr(value)  # an empty or whitespace default, e.g. sample.py's start="\n", shown visibly
    return str(value)


def help_text(config_cls=TrainConfig, prog="train.py", description=""):
    lines = [f"usage: {prog} [preset.toml ...] [--key=value ...]", ""]
    lines += [description, ""] if description else []
    lines.append("Presets (TOML files of key = value) apply in order, then --key=value overrides. Keys:")
    keys = _keys(config_cls)
    for f in dataclasses.fields(config_cls):
        typ, choices = keys[f.name]
        line = f"  --{f.name}=<{_type_name(typ)}> (default: {_show(f.default)}) {f.metadata.get('help', '')}"
        lines.append(line + (f" [choices: {'|'.join(map(str, choices))}]" if choices else ""))
    return "\n".join(lines)


def parse_args(argv=None, config_cls=TrainConfig, prog="train.py", description="", default_presets=()):
    """The command line -> a config_cls instance. --help prints every key and exits 0; a user
    error prints one line `error: ...` to stderr and exits 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(config_cls, prog, description))
        sys.exit(0)
    try:
        return load_config(argv, config_cls, default_presets)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def config_to_dict(cfg):
    """A config as a plain dict (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)


def config_from_dict(config_cls, d):
    """Rebuild a config from config_to_dict's output; missing keys take their defaults.
    Raises ConfigError on an unknown key or a value of the wrong type."""
    return config_cls(**_check(d.items(), config_cls))
