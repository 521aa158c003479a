"""Shared test set-up: offline tiktoken files when the project's ../shared folder is present."""
import os

import pytest

_SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
_CACHE = os.path.join(_SHARED, "tiktoken_cache")
if os.path.isdir(_CACHE):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.abspath(_CACHE))

GSM8K_DIR = os.path.abspath(os.path.join(_SHARED, "gsm8k"))


@pytest.fixture(scope="session")
def gpt2_encoding():
    """GPT-2's real tokenizer (from TIKTOKEN_CACHE_DIR offline, or downloaded)."""
    import tiktoken
    return tiktoken.get_encoding("gpt2")
