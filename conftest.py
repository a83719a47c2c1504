"""Test-wide environment, set before any test module imports torch, triton or tiktoken, so that
the order tests run in never matters; and the gpt2_encoding fixture for tests of GPT-2-tokenized data."""
import functools
import os
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # run the Triton kernels on the CPU (no GPU in CI)
_tiktoken_cache = Path(__file__).resolve().parent.parent / "shared" / "tiktoken_cache"
if _tiktoken_cache.is_dir():  # tiktoken's gpt2 files without network access
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_tiktoken_cache))


@functools.cache
def _tiktoken_gpt2_loads() -> bool:
    import prepare_data
    try:
        prepare_data._gpt2()
    except prepare_data.DataError:  # no TIKTOKEN_CACHE_DIR with its files, and no network
        return False
    return True


@functools.cache
def _stand_in_gpt2():
    """GPT-2's shape without its files: byte-level BPE with GPT-2's pre-tokenizer regex, ids 0..50256,
    <|endoftext|> = 50256; 256 single bytes and 50,000 byte pairs (printable ASCII pairs first) as its merges."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's regex, part of the tiktoken package
    printable = set(range(32, 127)) | {ord("\n")}
    pairs = sorted(((a, b) for a in range(256) for b in range(256)),
                   key=lambda p: (not {p[0], p[1]} <= printable, p))
    ranks = {bytes([i]): i for i in range(256)} | {bytes(p): 256 + i for i, p in enumerate(pairs[:50_000])}
    return tiktoken.Encoding("gpt2-stand-in", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


@pytest.fixture
def gpt2_encoding(monkeypatch):
    """prepare_data's GPT-2 encoding for a test: tiktoken's own where its files are at hand (../shared's
    tiktoken_cache, TIKTOKEN_CACHE_DIR or a download), else the stand-in above, so that the GPT-2 code paths
    run on a clone with no ../shared, offline. Returns True when it is the real one; tests of the real
    token ids skip otherwise."""
    if _tiktoken_gpt2_loads():
        return True
    monkeypatch.setattr("prepare_data._gpt2", _stand_in_gpt2)
    return False
