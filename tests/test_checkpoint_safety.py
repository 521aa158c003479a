"""Checkpoints that cannot run code, and checkpoints that do not match the flags.

A malicious pickle (an object whose unpickling creates a file) is refused by train.py's loading
path, in-process and at the command line, and the file is never created. A checkpoint whose model
shape or encoding differs from the flags fails with a message naming the flag. Every `torch.load`
in the project passes weights_only=True.
"""
from __future__ import annotations

import ast
import base64
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoints
import data as D
import train
from conftest import load_checkpoint
from model import GPT

REPO = Path(__file__).resolve().parent.parent
TINY = ["--n_layer", "1", "--n_head", "1", "--n_embd", "8", "--max_iters", "1", "--stage2_iters", "0",
        "--n_train", "40", "--n_test", "4", "--n_val", "2", "--eval_limit", "1"]


class Payload:
    """Unpickling this calls open(marker, "w"), which creates the marker file: code run by loading."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_malicious(path: Path, marker: Path, how: str) -> None:
    state = {"model": Payload(marker), "model_config": {"n_layer": 1}}
    if how == "torch.save":
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=int(how.split()[-1]))


def test_the_payload_is_live(tmp_path):
    """Control: plain unpickling of the same payload does create the file (so the refusal below matters)."""
    marker = tmp_path / "created"
    pickle.loads(pickle.dumps(Payload(marker))).close()
    assert marker.exists()


def tiny_config(encoding: str = D.SYNTHETIC_ENCODING, extra: list[str] | None = None):
    cfg = train.parse_args(TINY + ["--encoding", encoding] + (extra or []))
    return cfg, checkpoints.model_config(cfg, D.get_encoding(encoding))


@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 2", "pickle protocol 4"])
def test_malicious_checkpoint_is_refused(tmp_path, how):
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    write_malicious(path, marker, how)
    _, mconf = tiny_config()
    with pytest.raises(ValueError, match="refused to load.*could run code") as refusal:
        load_checkpoint(str(path), mconf, "cpu")
    assert not marker.exists()
    # The function named, not torch's advice to allow it (protocol 4 fails on an opcode before naming it).
    named = "Unsupported operand" if how == "pickle protocol 4" else "a pickled Python object (io.open)"
    assert named in str(refusal.value) and "safe_globals" not in str(refusal.value)


def test_malicious_checkpoint_at_the_command_line(tmp_path):
    path, marker, out = tmp_path / "evil.pt", tmp_path / "pwned", tmp_path / "out"
    write_malicious(path, marker, "torch.save")
    proc = subprocess.run([sys.executable, "train.py", *TINY, "--init_from", str(path), "--out_dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: refused to load" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not marker.exists() and not out.exists()


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, GPT]:
    """A real checkpoint of the tiny model, written by train.save_checkpoint (no training needed)."""
    cfg, mconf = tiny_config()
    torch.manual_seed(0)
    model = GPT(mconf)
    path = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint(str(path), model, None, cfg, step=0)
    return path, model


def test_matching_checkpoint_loads(checkpoint):
    path, model = checkpoint
    _, mconf = tiny_config()
    loaded, ckpt = load_checkpoint(str(path), mconf, "cpu", encoding=D.SYNTHETIC_ENCODING)
    assert ckpt["step"] == 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def write_tiktoken(path: Path, merges: list[bytes]) -> None:
    ranks = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))


def mismatch_cases(tmp_path: Path) -> list[tuple[list[str], list[str]]]:
    """(flags, fragments the error must hold); expected numbers come from the configs, not a run."""
    _, mine = tiny_config()
    _, gpt2 = tiny_config("gpt2")
    other = tmp_path / "other.tiktoken"  # a different encoding whose padded vocabulary is the same size
    write_tiktoken(other, [b"ab", b"cd", b"ef"])
    assert tiny_config(str(other))[1].vocab_size == mine.vocab_size
    return [
        (["--n_layer", "2"], ["--n_layer: n_layer=1 in the checkpoint but 2 here"]),
        (["--n_embd", "16"], ["--n_embd: n_embd=8 in the checkpoint but 16 here"]),
        (["--block_size", "64"], [f"--block_size: block_size={mine.block_size} in the checkpoint but 64 here"]),
        (["--encoding", "gpt2"], [f"--encoding: vocab_size={mine.vocab_size} in the checkpoint but "
                                  f"{gpt2.vocab_size} here", "--encoding: sftkey-chars in the checkpoint but gpt2"]),
        (["--encoding", str(other)], [f"--encoding: sftkey-chars in the checkpoint but {other} here"]),
    ]


def test_mismatched_flags_are_named(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    for flags, fragments in mismatch_cases(tmp_path):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            train.main(TINY + ["--init_from", str(path), "--out_dir", str(out), *flags])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        assert f"{path} does not match the flags" in err
        for fragment in fragments:
            assert fragment in err, (flags, err)
        assert not out.exists()


@pytest.mark.parametrize("contents, problem", [
    (b"", "not a readable PyTorch checkpoint"),
    (b"PK\x03\x04 truncated zip", "not a readable PyTorch checkpoint"),
    (b"notes, not a checkpoint\n", "refused to load: the safe loader met Unsupported operand"),  # no "Python object"
    ("fifo", "checkpoint .*bad.pt: not a regular file \\(a FIFO\\)"),  # torch.load would wait for a writer
    ([1, 2, 3], "not an sftkey checkpoint"),
    ({"model": {}, "model_config": {"n_layer": 1, "colour": "red"}}, "does not describe this project's GPT"),
    ({"model": {"w": torch.zeros(1)}, "model_config": {"n_layer": 1, "n_head": 3, "n_embd": 64}},
     "GPT \\(n_head 3 does not divide n_embd 64\\)"),  # the reason, not empty brackets
    ("missing weights", "are not this model's float32 tensors"),
], ids=["empty", "truncated", "text", "a FIFO", "a list", "unknown config field", "heads", "missing weights"])
def test_unusable_checkpoints(checkpoint, tmp_path, contents, problem):
    path, model = checkpoint
    bad = tmp_path / "bad.pt"
    if isinstance(contents, bytes):
        bad.write_bytes(contents)
    elif contents == "fifo":
        os.mkfifo(bad)
    elif contents == "missing weights":
        state = torch.load(path, weights_only=True)
        state["model"].pop("transformer.wte.weight")
        torch.save(state, bad)
    else:
        torch.save(contents, bad)
    with pytest.raises(ValueError, match=problem) as refusal:
        load_checkpoint(str(bad), model.config, "cpu")
    assert "Python object" not in str(refusal.value)  # said only of a file that holds one (the tests above)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused(checkpoint, tmp_path, value):
    """A corrupted file: evaluating it would score 0 with exit 0, sampling it would fail deep in torch.multinomial."""
    path, model = checkpoint
    state = torch.load(path, weights_only=True)
    state["model"]["transformer.h.0.mlp.c_fc.weight"][3, 5] = value
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="weight tensor transformer.h.0.mlp.c_fc.weight holds NaN or inf"):
        load_checkpoint(str(tmp_path / "bad.pt"), model.config, "cpu")


def test_every_torch_load_is_weights_only():
    """Scan the project's Python files: each torch.load call passes weights_only=True literally."""
    calls = 0
    for path in sorted(REPO.rglob("*.py")):
        if any(part.startswith(".") for part in path.relative_to(REPO).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                calls += 1
                safe = [k for k in node.keywords if k.arg == "weights_only"
                        and isinstance(k.value, ast.Constant) and k.value.value is True]
                assert safe, f"{path.relative_to(REPO)}:{node.lineno}: torch.load without weights_only=True"
    assert calls >= 2  # train.py's loader and this file's own
