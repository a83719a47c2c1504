"""Test-wide environment, set before any test module imports torch, triton or tiktoken, so that
the order tests run in never matters."""
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # run the Triton kernels on the CPU (no GPU in CI)
_tiktoken_cache = Path(__file__).resolve().parent.parent / "shared" / "tiktoken_cache"
if _tiktoken_cache.is_dir():  # tiktoken's gpt2 files without network access
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_tiktoken_cache))
