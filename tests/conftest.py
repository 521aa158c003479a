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

# The offline tiktoken files (gpt2, cl100k_base) are in the same folder; tests of real encodings need them
# or a network, and skip only on a machine without ../shared.
needs_tiktoken_cache = pytest.mark.skipif(not os.path.isdir(_CACHE), reason=f"no tiktoken cache at {_CACHE}")

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


# The training-loop tests' common set-up: a tokenized synthetic set, a tiny model, a loop config.
@pytest.fixture(scope="session")
def tokenized():
    import data as D
    return D.tokenize(D.synthetic_task(42, seed=3), D.char_encoding(), block_size=96)  # 1 to 5 steps: varied lengths


def tiny_model(seed: int = 0, n_embd: int = 32, dropout: float = 0.0):
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=320, block_size=96, n_layer=1, n_head=2, n_embd=n_embd, dropout=dropout))


def config(**overrides):
    import train
    base = dict(batch_size=4, log_interval=1000, eval_interval=1000, warmup_iters=0, weight_decay=0.0, seed=7)
    return train.TrainConfig(**{**base, **overrides})


def run_train(model, data, cfg, iters, peak_lr=1e-2, weights=(0.0, 1.0, 1.0), steps_before=0):
    import sftkey
    import train
    return train.train(model, data, data, cfg, sftkey.Stage("test", weights, iters, peak_lr), "cpu", torch.float32, [],
                       steps_before=steps_before)


def load_checkpoint(path: str, expected, device: str, encoding: str | None = None):
    """The model a checkpoint holds (read by checkpoints.read_checkpoint, with its checks), on `device`, and the
    checkpoint."""
    import checkpoints
    from model import GPT, GPTConfig
    ckpt = checkpoints.read_checkpoint(path, expected, device, encoding)
    model = GPT(GPTConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model, ckpt


class Frozen(torch.optim.Optimizer):
    """Stands in for AdamW in train.train: changes nothing (AdamW is not under test where it is used)."""

    def __init__(self, params):
        super().__init__(list(params), {"lr": 0.0})

    def step(self, closure=None):
        pass


def for_data(flags: list[str]) -> list[str]:
    """`flags` without the synthetic task's flags and their values, for a run on --data (which refuses them)."""
    import runtime
    synthetic = {f"--{name}" for name in runtime.SYNTHETIC}
    return [flag for i, flag in enumerate(flags) if flag not in synthetic and (i == 0 or flags[i - 1] not in synthetic)]


def run_cli(main, args: list[str], capsys) -> tuple[int, str, str]:
    """A command's exit code (0 when `main(args)` returns), stdout and stderr."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stage_fields(kwargs: dict) -> dict:
    """train.train's arguments with its `stage` spelled out, as the fakes of the loop record them."""
    stage = kwargs["stage"]
    return {**kwargs, "stage": stage.name, "weights": stage.weights, "iters": stage.iters, "peak_lr": stage.lr,
            "dft": stage.dft}
