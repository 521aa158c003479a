"""Shared test set-up: offline tiktoken files when the project's ../shared folder is present."""
import os

# The tests use tiny models, for which thread start-up costs more than it saves; on a shared machine
# two threads per process can be far slower still. Subprocesses (CLI and DDP tests) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

_SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
_CACHE = os.path.join(_SHARED, "tiktoken_cache")
if os.path.isdir(_CACHE):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.abspath(_CACHE))

GSM8K_DIR = os.path.abspath(os.path.join(_SHARED, "gsm8k"))
# The real GSM8K files are the project's ../shared copy (CI always has it); the project itself does not
# need them, so on a machine without them the tests that read them say so and skip.
needs_gsm8k = pytest.mark.skipif(not os.path.isfile(os.path.join(GSM8K_DIR, "train.jsonl")),
                                 reason=f"the GSM8K files are not at {GSM8K_DIR}")


@pytest.fixture(scope="session")
def gpt2_encoding():
    """GPT-2's real tokenizer (from TIKTOKEN_CACHE_DIR offline, or downloaded)."""
    import tiktoken
    return tiktoken.get_encoding("gpt2")
