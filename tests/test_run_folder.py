"""One run per --out_dir, and checkpoint files that survive what a careful user's runs meet (issue 18).

--resume continues only a checkpoint written with the same flags and input files (item 1); a fresh
run refuses a folder holding another run's files, --overwrite deletes exactly those (item 2); an
unusable --out_dir is found before training (item 4); a full disk is named, cleaned up and leaves
the previous checkpoint (item 5); a second run into a locked folder refuses, naming the holder, and
a dead holder's lock is taken over (item 6); temporary files are unique and never follow a planted
link (item 7); malformed checkpoints on the resume path give one clean line (item 8); --resume with
no checkpoint says so, and checkpoints are written by wall time by default (item 9); writes are
fsync'ed, file and folder (item 13).
"""
from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoints
import runtime
import data as D
import train
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8", "--n_val", "10",
        "--max_iters", "12", "--stage2_iters", "6", "--warmup_iters", "2", "--log_interval", "4",
        "--eval_interval", "100", "--dtype", "float32", "--device", "cpu", "--ckpt_interval", "4",
        "--format", "tagged"]


class Killed(RuntimeError):
    """Stands for a kill -9: the run stops where it is, nothing more is written."""


def write_data(path: Path, offset: int = 0) -> Path:
    rows = [{"prompt": f"What is {a}+{b}?", "thinking": f"{a}+{b}={a + b + offset}", "answer": str(a + b + offset)}
            for a in range(8) for b in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tiktoken(path: Path, merges: list[bytes]) -> Path:
    ranks = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    return path


def flags(folder: Path, data: Path, *extra: str) -> list[str]:
    return [*TINY, "--data", str(data), "--out_dir", str(folder), *extra]


def kill_at(monkeypatch, batch: int) -> None:
    original = D.Batches.get

    def get(self, i, device, **split):
        if i == batch:
            raise Killed(f"killed while fetching batch {i}")
        return original(self, i, device, **split)
    monkeypatch.setattr(D.Batches, "get", get)


def interrupted_run(folder: Path, data: Path, *extra: str) -> None:
    """A run killed during step 9 of stage 1: its last checkpoint, at step 8, is in folder/sft_tag."""
    with pytest.MonkeyPatch.context() as mp:
        kill_at(mp, 9)
        with pytest.raises(Killed):
            train.run(train.parse_args(flags(folder, data, *extra)))
    assert torch.load(folder / "sft_tag" / "ckpt.pt", weights_only=True)["step"] == 8


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Made once for the module, copied by each test: a data file, an interrupted and a finished run."""
    root = tmp_path_factory.mktemp("made")
    data = write_data(root / "data.jsonl")
    interrupted_run(root / "interrupted", data)
    train.run(train.parse_args(flags(root / "finished", data)))
    return {"root": root, "data": data, "interrupted": root / "interrupted", "finished": root / "finished"}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def main(args: list[str], capsys) -> tuple[int, str]:
    """train.main's exit code (0 when it returns) and stderr."""
    try:
        train.main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def no_training(monkeypatch) -> None:
    """Any training step taken fails the test: a refusal must come before training."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(train, "train", refuse)


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.strip().count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ---------------------------------------------------------------------------------------------
# Item 1: --resume compares every flag that decides the result, and the input files' contents

FLAG_CHANGES = [
    (["--lr", "1e-2"], "--lr: 0.002 in the checkpoint, 0.01 here"),
    (["--batch_size", "4"], "--batch_size: 8 in the checkpoint, 4 here"),
    (["--seed", "7"], "--seed: 1337 in the checkpoint, 7 here"),
    (["--max_iters", "6"], "--max_iters: 12 in the checkpoint, 6 here"),  # below the saved step 8
    (["--max_iters", "20"], "--max_iters: 12 in the checkpoint, 20 here"),
    (["--weight_decay", "0"], "--weight_decay: 0.1 in the checkpoint, 0.0 here"),
    (["--grad_clip", "0.5"], "--grad_clip: 1.0 in the checkpoint, 0.5 here"),
    (["--warmup_iters", "3"], "--warmup_iters: 2 in the checkpoint, 3 here"),
    (["--min_lr_ratio", "0.2"], "--min_lr_ratio: 0.1 in the checkpoint, 0.2 here"),
    (["--key_only"], "--key_only: False in the checkpoint, True here"),
    (["--key_weight", "2"], "--key_weight: 1.0 in the checkpoint, 2.0 here"),
    (["--grad_accum", "2"], "--grad_accum: 1 in the checkpoint, 2 here"),
    (["--stage2_iters", "3"], "--stage2_iters: 6 in the checkpoint, 3 here"),
    (["--n_val", "12"], "--n_val: 10 in the checkpoint, 12 here"),
    (["--dtype", "bfloat16"], "--dtype: float32 in the checkpoint, bfloat16 here"),
]


@pytest.mark.parametrize("change, message", FLAG_CHANGES, ids=[" ".join(c) for c, _ in FLAG_CHANGES])
def test_resume_refuses_changed_flags(made, tmp_path, capsys, monkeypatch, change, message):
    out = copy(made["interrupted"], tmp_path / "out")
    before = digests(out)
    no_training(monkeypatch)
    code, err = main(flags(out, made["data"], "--resume", *change), capsys)
    one_line_error(code, err, f"{out / 'sft_tag' / 'ckpt.pt'} was written by another run", message, "--overwrite")
    assert digests(out) == before


def test_resume_refuses_other_data(made, tmp_path, capsys, monkeypatch):
    """Another --data path, and another file's contents at the same path, are both another run."""
    out = copy(made["interrupted"], tmp_path / "out")
    no_training(monkeypatch)
    other = write_data(tmp_path / "other.jsonl", offset=1)
    code, err = main(flags(out, other, "--resume"), capsys)
    one_line_error(code, err, f"--data: {made['data']} in the checkpoint, {other} here")
    # The checkpoint names a path whose file has since been rewritten: the hash it holds is the old file's.
    same_path = write_data(tmp_path / "data.jsonl", offset=1)
    ckpt = torch.load(out / "sft_tag" / "ckpt.pt", weights_only=True)
    ckpt["train_config"]["data"] = str(same_path)
    torch.save(ckpt, out / "sft_tag" / "ckpt.pt")
    code, err = main(flags(out, same_path, "--resume"), capsys)
    one_line_error(code, err, f"--data {same_path}: other contents (sha256 "
                              f"{hashlib.sha256(made['data'].read_bytes()).hexdigest()[:12]}… in the checkpoint, "
                              f"sha256 {hashlib.sha256(same_path.read_bytes()).hexdigest()[:12]}… here)")


def test_resume_refuses_another_tiktoken_file(tmp_path, capsys, monkeypatch):
    """A .tiktoken file edited in place (same name, same vocabulary size) is another encoding."""
    data = write_data(tmp_path / "data.jsonl")
    encoding = write_tiktoken(tmp_path / "enc.tiktoken", [b"ab", b"cd", b"ef"])
    out = tmp_path / "out"
    interrupted_run(out, data, "--encoding", str(encoding))
    write_tiktoken(encoding, [b"12", b"+3", b"=4"])
    no_training(monkeypatch)
    code, err = main(flags(out, data, "--resume", "--encoding", str(encoding)), capsys)
    one_line_error(code, err, f"--encoding {encoding}: other contents")


# --init_from builds on a stage: it must be finished, read with its own tokenizer bytes, and scored in its layout.
# (Found by trying: each was accepted, exit 0, and named or scored as if all were well.)

def test_init_from_refuses_a_stage_stopped_before_its_end(made, tmp_path, capsys, monkeypatch):
    """Stage 1 cut at step 8 of 12, built on, would be reported as the method after a full stage 1."""
    cut, whole = (made[run] / "sft_tag" / "ckpt.pt" for run in ("interrupted", "finished"))
    assert torch.load(cut, weights_only=True)["finished"] is False
    assert torch.load(whole, weights_only=True)["finished"] is True
    no_training(monkeypatch)
    for extra in (["--max_iters", "0"], ["--eval_only"]):
        code, err = main(flags(tmp_path / "out", made["data"], "--init_from", str(cut), *extra, "--eval_data",
                               str(made["data"])), capsys)
        one_line_error(code, err, f"--init_from {cut}: stage sft_tag stopped at step 8: finish it with --resume first")


def test_init_from_refuses_a_tiktoken_file_changed_since_training(tmp_path, capsys, monkeypatch):
    """The checkpoint's ids would stand for other bytes; the same name and vocabulary size hide it."""
    data = write_data(tmp_path / "data.jsonl")
    encoding = write_tiktoken(tmp_path / "enc.tiktoken", [b"ab", b"cd", b"ef"])
    train.run(train.parse_args(flags(tmp_path / "first", data, "--encoding", str(encoding), "--stage2_iters", "0")))
    start = ["--encoding", str(encoding), "--init_from", str(tmp_path / "first" / "sft_tag" / "ckpt.pt")]
    write_tiktoken(encoding, [b"12", b"+3", b"=4"])
    no_training(monkeypatch)
    for extra in (["--max_iters", "0"], ["--eval_only", "--eval_data", str(data)]):
        code, err = main(flags(tmp_path / "second", data, *start, *extra), capsys)
        one_line_error(code, err, "not the tokenizer file it was trained with (another sha256)")


def test_eval_only_scores_a_checkpoint_in_the_layout_it_was_trained_in(made, tmp_path, capsys, monkeypatch):
    """An untagged model scored as tagged has Acc 0 and Fmt 0 whatever it learnt (and the reverse)."""
    whole = made["finished"] / "sftkey_tag" / "ckpt.pt"  # tagged
    scored = flags(tmp_path / "out", made["data"], "--init_from", str(whole), "--eval_only", "--eval_data",
                   str(made["data"]))
    code, err = main([*scored, "--untagged"], capsys)
    one_line_error(code, err, f"--init_from {whole}: trained without --untagged")
    code, err = main(scored, capsys)
    assert code == 0, err


def test_eval_only_scores_a_synthetic_checkpoint_on_the_task_it_was_trained_on(tmp_path, capsys):
    """Review (attack): a --task parity model scored on arithmetic, whose answers are numbers, got Acc 0, exit 0;
    so did a model of a --data file scored, without --data, on the synthetic task (review of the fix)."""
    tiny = [*TINY[:10], "--max_iters", "2", "--stage2_iters", "0", "--n_train", "200", "--n_test", "4"]
    assert main([*tiny, "--task", "parity", "--out_dir", str(tmp_path / "parity")], capsys)[0] == 0
    scored = [*tiny, "--eval_only", "--init_from", str(tmp_path / "parity" / "sft_tag" / "ckpt.pt")]
    code, err = main([*scored, "--out_dir", str(tmp_path / "as_arithmetic")], capsys)
    one_line_error(code, err, "trained on --task parity, not --task arithmetic: evaluate it on --task parity")
    assert not (tmp_path / "as_arithmetic").exists()
    assert main([*scored, "--task", "parity", "--out_dir", str(tmp_path / "as_parity")], capsys)[0] == 0
    data = write_data(tmp_path / "data.jsonl")  # and a model of a --data file scored on the synthetic task
    trained = [*tiny[:-4], "--data", str(data), "--format", "tagged", "--eval_data", str(data), "--eval_limit", "2"]
    assert main([*trained, "--out_dir", str(tmp_path / "on_data")], capsys)[0] == 0
    code, err = main([*tiny, "--eval_only", "--init_from", str(tmp_path / "on_data" / "sft_tag" / "ckpt.pt"),
                      "--out_dir", str(tmp_path / "on_task")], capsys)
    one_line_error(code, err, "trained on --data, not --task arithmetic: evaluate it on --data")
    assert not (tmp_path / "on_task").exists()


def test_resume_with_the_same_flags_continues(made, tmp_path, capsys):
    """Control: flags that cannot change the result may differ; the run resumes and finishes."""
    out = copy(made["interrupted"], tmp_path / "out")
    code, err = main(flags(out, made["data"], "--resume", "--log_interval", "3", "--eval_batch_size", "5",
                           "--ckpt_interval", "0", "--eval_interval", "50"), capsys)
    assert code == 0, err
    assert torch.load(out / "sftkey_tag" / "ckpt.pt", weights_only=True)["step"] == 6


def test_resume_compares_the_dtype_that_auto_resolved_to(made, tmp_path, capsys, monkeypatch):
    """A run records the dtype --dtype auto resolved to: resumed with auto where that means float32 (as the run
    computed) it goes on; on a machine where auto means bfloat16 it is refused, not continued in another dtype."""
    resolve = runtime.resolve_device
    for here, code_wanted in ((torch.float32, 0), (torch.bfloat16, 2)):
        out = copy(made["interrupted"], tmp_path / str(here))
        monkeypatch.setattr(runtime, "resolve_device", lambda cfg, dist=None: (
            resolve(cfg, dist)[0], here if cfg.dtype == "auto" else resolve(cfg, dist)[1]))
        args = [*flags(out, made["data"], "--resume"), "--dtype", "auto"]  # the last --dtype wins
        code, err = main(args, capsys)
        assert code == code_wanted, err
        if code:
            one_line_error(code, err, "--dtype: float32 in the checkpoint, bfloat16 here")
        else:
            assert json.loads((out / "results.json").read_text())["config"]["dtype"] == "float32"


def test_a_checkpoint_that_recorded_dtype_auto_resumes_where_auto_means_its_dtype(made, tmp_path, capsys):
    """Checkpoints written before runs recorded the resolved dtype say "auto": found in review, no --dtype could
    resume them. "auto" is compared as what auto means here: float32 for this model on a CPU."""
    out = copy(made["interrupted"], tmp_path / "out")
    path = out / "sft_tag" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["train_config"]["dtype"] = "auto"
    torch.save(ckpt, path)
    code, err = main([*flags(out, made["data"], "--resume"), "--dtype", "bfloat16"], capsys)
    one_line_error(code, err, "--dtype: float32 in the checkpoint, bfloat16 here")
    code, err = main([*flags(out, made["data"], "--resume"), "--dtype", "auto"], capsys)
    assert code == 0, err


def test_resume_mismatches_names_every_field(tmp_path):
    """Every field runtime.FLAGS marks "same", new and removed fields too (tests/test_flags.py: each field)."""
    data = write_data(tmp_path / "data.jsonl")
    cfg = train.parse_args(flags(tmp_path / "out", data))
    saved = {"train_config": train.dataclasses.asdict(cfg), "file_hashes": {"--data": "ab" * 32}}
    assert checkpoints.resume_mismatches(saved, cfg, {"--data": "ab" * 32}) == []
    neutral = train.dataclasses.replace(cfg, out_dir="elsewhere", log_interval=1, eval_batch_size=3, eval_interval=7,
                                        ckpt_interval=2, device="cuda", compile=True, resume=True)
    assert checkpoints.resume_mismatches(saved, neutral) == []
    decisive = [name for name, (_, resume, _) in runtime.FLAGS.items() if resume == "same"]
    assert {"lr", "seed", "data", "encoding", "max_iters", "key_only", "dropout", "init_from"} <= set(decisive)
    saved["train_config"]["future_flag"] = 3
    del saved["train_config"]["lr"]
    assert checkpoints.resume_mismatches(saved, train.dataclasses.replace(cfg, lr=3e-3)) == [
        "--lr: not recorded in the checkpoint, 0.003 here", "--future_flag: 3 in the checkpoint, no such flag here"]
    # A flag added since the checkpoint was written (--stage2_dft was), at its default here: the run as it ran.
    # Found in review: resuming any run interrupted before the flag existed was refused, naming no flag that helps.
    del saved["train_config"]["future_flag"], saved["train_config"]["stage2_dft"]
    assert checkpoints.resume_mismatches(saved, cfg) == []  # lr: not recorded, and the default here
    assert checkpoints.resume_mismatches(saved, train.dataclasses.replace(cfg, stage2_dft=True)) == [
        "--stage2_dft: not recorded in the checkpoint, True here"]



def test_resume_continues_a_data_run_that_was_given_a_synthetic_task_flag_it_ignored(tmp_path):
    """Found in review: --data took --task, --n_train, --n_test and --data_seed and ignored them until fb51552, which
    refuses them with --data. A run so started and interrupted could then not be resumed: with the flag check_config
    refused it, without it resume_mismatches named it ("--n_train: 1000 in the checkpoint, 20000 here"). They did
    nothing in that run, so they are not compared; in a synthetic run they still are."""
    data = write_data(tmp_path / "data.jsonl")
    cfg = train.parse_args(flags(tmp_path / "out", data))
    ignored = {"task": "parity", "n_train": 1000, "n_test": 7, "data_seed": 3}
    assert checkpoints.resume_mismatches({"train_config": {**train.dataclasses.asdict(cfg), **ignored}}, cfg) == []
    synthetic = train.dataclasses.replace(cfg, data="", eval_data="")
    assert checkpoints.resume_mismatches({"train_config": {**train.dataclasses.asdict(synthetic), **ignored}},
                                         synthetic) == [
        "--task: parity in the checkpoint, arithmetic here", "--n_train: 1000 in the checkpoint, 20000 here",
        "--n_test: 7 in the checkpoint, 500 here", "--data_seed: 3 in the checkpoint, 0 here"]

def test_resume_refuses_a_checkpoint_that_recorded_no_hash_of_an_input(tmp_path):
    """A checkpoint without the sha256 of --data (an older one, or its entry lost) cannot show that the file is the
    one it trained on: a mismatch, not a pass."""
    data = write_data(tmp_path / "data.jsonl")
    cfg = train.parse_args(flags(tmp_path / "out", data))
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    for saved in ({"train_config": train.dataclasses.asdict(cfg)},
                  {"train_config": train.dataclasses.asdict(cfg), "file_hashes": {"--encoding": digest}}):
        diffs = checkpoints.resume_mismatches(saved, cfg, {"--data": digest})
        assert diffs == [f"--data {data}: other contents (not recorded in the checkpoint, sha256 {digest[:12]}… here)"]


# ---------------------------------------------------------------------------------------------
# Item 2: one run per folder

def test_fresh_run_refuses_a_folder_holding_another_run(made, tmp_path, capsys, monkeypatch):
    out = copy(made["finished"], tmp_path / "out")
    before = digests(out)
    no_training(monkeypatch)
    code, err = main(flags(out, made["data"], "--lr", "2e-3"), capsys)
    one_line_error(code, err, f"--out_dir {out} holds the files of an earlier run", str(out / "sft_tag" / "ckpt.pt"),
                   str(out / "sftkey_tag" / "ckpt.pt"), str(out / "results.json"), "--resume", "--overwrite")
    assert digests(out) == before


def test_overwrite_deletes_exactly_the_run_files(made, tmp_path, capsys):
    out = copy(made["finished"], tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    (out / "sft_tag" / "keep.txt").write_text("mine too")
    code, err = main(flags(out, made["data"], "--lr", "2e-3", "--overwrite"), capsys)
    assert code == 0, err
    assert err.count("--overwrite: deleted") == 1 and all(str(out / name) in err for name in (
        "results.json", "sft_tag/ckpt.pt", "sftkey_tag/ckpt.pt"))
    assert (out / "notes.txt").read_text() == "mine" and (out / "sft_tag" / "keep.txt").read_text() == "mine too"
    assert json.loads((out / "results.json").read_text())["config"]["lr"] == 2e-3
    for stage in ("sft_tag", "sftkey_tag"):
        assert torch.load(out / stage / "ckpt.pt", weights_only=True)["train_config"]["lr"] == 2e-3


def test_resume_refuses_a_finished_stage_of_another_run(made, tmp_path, capsys, monkeypatch):
    """Run B, interrupted in stage 1, in a folder holding run A's finished stage 2: --resume must not
    skip B's stage 2 and report A's results as B's."""
    out = tmp_path / "out"
    interrupted_run(out, made["data"], "--lr", "3e-3")
    shutil.copytree(made["finished"] / "sftkey_tag", out / "sftkey_tag")
    no_training(monkeypatch)
    code, err = main(flags(out, made["data"], "--lr", "3e-3", "--resume"), capsys)
    one_line_error(code, err, f"{out / 'sftkey_tag' / 'ckpt.pt'} was written by another run",
                   "--lr: 0.002 in the checkpoint, 0.003 here")


# ---------------------------------------------------------------------------------------------
# Item 4: an unusable --out_dir is found before training

def _under_a_file(tmp: Path) -> tuple[Path, str]:
    (tmp / "afile").write_text("x")
    return tmp / "afile" / "out", "cannot create"


def _stage_is_a_file(tmp: Path) -> tuple[Path, str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "sft_tag").write_text("x")
    return tmp / "out", f"{tmp / 'out' / 'sft_tag'} is a file, not a folder"


def _ckpt_is_a_folder(tmp: Path) -> tuple[Path, str]:
    (tmp / "out" / "sftkey_tag" / "ckpt.pt").mkdir(parents=True)
    return tmp / "out", f"{tmp / 'out' / 'sftkey_tag' / 'ckpt.pt'} is a folder, not a file"


def _results_is_a_folder(tmp: Path) -> tuple[Path, str]:
    (tmp / "out" / "results.json").mkdir(parents=True)
    return tmp / "out", f"{tmp / 'out' / 'results.json'} is a folder, not a file"


UNWRITABLE = [_under_a_file, _stage_is_a_file, _ckpt_is_a_folder, _results_is_a_folder]


@pytest.mark.parametrize("make", UNWRITABLE, ids=[m.__name__[1:] for m in UNWRITABLE])
def test_unusable_out_dir_is_refused_before_training(made, tmp_path, capsys, monkeypatch, make):
    out, problem = make(tmp_path)
    no_training(monkeypatch)
    code, err = main(flags(out, made["data"]), capsys)
    one_line_error(code, err, f"--out_dir {out}: the run could not write its files there", problem,
                   "Nothing was trained")


def test_read_only_file_system_is_refused_before_training(made, tmp_path, capsys, monkeypatch):
    """The tests run as root, whom permission bits do not stop: a read-only file system is simulated
    where every file creation happens: TemporaryFile (the probe), mkstemp (every atomic write) and mkdir."""
    out = tmp_path / "out"
    out.mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(checkpoints.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(checkpoints.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(checkpoints.os, "mkdir", read_only)
    no_training(monkeypatch)
    code, err = main(flags(out, made["data"]), capsys)
    one_line_error(code, err, f"cannot create files in {out} (Read-only file system)", "Nothing was trained")


# ---------------------------------------------------------------------------------------------
# Item 5: a full disk

@pytest.fixture
def saved_once(tmp_path) -> tuple[str, GPT, train.TrainConfig]:
    cfg = train.parse_args(["--out_dir", str(tmp_path)])
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=1, n_embd=8))
    path = str(tmp_path / "stage" / "ckpt.pt")
    checkpoints.save_checkpoint(path, model, None, cfg, step=1)
    return path, model, cfg


def assert_intact(path: str) -> None:
    assert os.listdir(os.path.dirname(path)) == ["ckpt.pt"]  # the partial temporary file is gone
    assert torch.load(path, weights_only=True)["step"] == 1


def test_full_disk_during_torch_save(saved_once, monkeypatch):
    """The real torch.save, on a file whose writes fail with ENOSPC after 1 kB: torch reports only
    "unexpected pos"; the error says the disk is full, names the file, and the temporary is gone."""
    path, model, cfg = saved_once
    real_open = open

    class Full(io.RawIOBase):
        def __init__(self, f):
            super().__init__()
            self.f, self.n = f, 0

        def writable(self):
            return True

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()
            super().close()

    def opener(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if isinstance(file, int) and "w" in mode else f
    monkeypatch.setattr(checkpoints, "open", opener, raising=False)
    with pytest.raises(checkpoints.WriteError) as info:
        checkpoints.save_checkpoint(path, model, None, cfg, step=2)
    assert str(info.value).startswith(f"could not write {path}: the disk is full")
    assert "the previous file there is intact" in str(info.value)
    assert_intact(path)


@pytest.mark.parametrize("where", ["torch.save", "fsync"])
def test_failed_write_is_named_and_cleaned_up(saved_once, monkeypatch, where):
    path, model, cfg = saved_once
    if where == "torch.save":
        def broken(obj, f, *args, **kwargs):
            f.write(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        monkeypatch.setattr(torch, "save", broken)
        expected = "the write failed (RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos"
    else:
        def broken(fd):  # delayed allocation: the full disk shows at fsync
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", broken)
        expected = "the disk is full (OSError: [Errno 28] No space left on device)"
    with pytest.raises(checkpoints.WriteError) as info:
        checkpoints.save_checkpoint(path, model, None, cfg, step=2)
    assert str(info.value).startswith(f"could not write {path}: {expected}"), str(info.value)
    assert_intact(path)


def test_full_disk_at_the_command_line(made, tmp_path, capsys, monkeypatch):
    """The second checkpoint write (step 8) meets a full disk: one line, exit 1, the step-4 checkpoint kept."""
    out = tmp_path / "out"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    code, err = main(flags(out, made["data"]), capsys)
    assert code == 1 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert err.startswith(f"stopped: could not write {out / 'sft_tag' / 'ckpt.pt'}: the disk is full"), err
    assert os.listdir(out / "sft_tag") == ["ckpt.pt"]
    assert torch.load(out / "sft_tag" / "ckpt.pt", weights_only=True)["step"] == 4


# ---------------------------------------------------------------------------------------------
# Item 6: the lock

def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding the folder's lock until its stdin closes, then releasing it."""
    code = ("import sys, checkpoints; lock = checkpoints.FolderLock(sys.argv[1]); lock.acquire(); "
            "print('locked', flush=True); sys.stdin.read(); lock.release()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_is_refused_naming_the_holder(made, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        holder_name = f"pid {holder.pid} on {socket.gethostname()}"
        with pytest.raises(ValueError, match=f"in use by another run \\({holder_name}"):
            checkpoints.FolderLock(str(out)).acquire()
        no_training(monkeypatch)
        code, err = main(flags(out, made["data"]), capsys)
        one_line_error(code, err, f"--out_dir {out} is in use by another run ({holder_name}")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    lock = checkpoints.FolderLock(str(out))
    lock.acquire()  # free again: taken without a note
    assert (out / ".sftkey.lock").read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    lock.release()
    assert "took over" not in capsys.readouterr().err
    assert not (out / ".sftkey.lock").exists()


def test_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    holder.send_signal(signal.SIGKILL)  # no chance to clean up: its lock file stays behind
    holder.wait(timeout=60)
    holder.stdin.close()
    assert (out / ".sftkey.lock").exists()
    lock = checkpoints.FolderLock(str(out))
    lock.acquire()
    err = capsys.readouterr().err
    lock.release()
    assert f"took over the lock {out / '.sftkey.lock'} left by pid {holder.pid}" in err
    assert err.strip().count("\n") == 0


# ---------------------------------------------------------------------------------------------
# Item 7: unique temporary files, never a planted link

def test_planted_symlinks_are_not_followed(tmp_path):
    cfg = train.parse_args(["--out_dir", str(tmp_path)])
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=1, n_embd=8))
    precious = tmp_path / "precious"
    precious.write_text("precious")
    folder = tmp_path / "stage"
    folder.mkdir()
    guesses = ["ckpt.pt.tmp", ".ckpt.pt.tmp", "results.json.tmp", ".results.json.tmp"]
    for name in guesses:
        (folder / name).symlink_to(precious)
    checkpoints.save_checkpoint(str(folder / "ckpt.pt"), model, None, cfg, step=3)
    checkpoints.write_json(str(folder / "results.json"), {"ok": 1})
    assert precious.read_text() == "precious"
    assert all((folder / name).is_symlink() for name in guesses)
    assert torch.load(folder / "ckpt.pt", weights_only=True)["step"] == 3
    assert json.loads((folder / "results.json").read_text()) == {"ok": 1}


def test_each_write_has_its_own_temporary(tmp_path, monkeypatch):
    """Two writers of one file never share a temporary name (a torn file could be published)."""
    cfg = train.parse_args(["--out_dir", str(tmp_path)])
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=1, n_embd=8))
    path, sources, real_replace = tmp_path / "ckpt.pt", [], os.replace

    def replace(src, dst):
        sources.append(Path(src))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    for step in (1, 2):
        checkpoints.save_checkpoint(str(path), model, None, cfg, step=step)
    assert len(set(sources)) == 2 and all(s.parent == tmp_path and s != tmp_path / "ckpt.pt.tmp" for s in sources)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~checkpoints._UMASK)  # not mkstemp's 0600


# ---------------------------------------------------------------------------------------------
# Item 8: malformed checkpoints on the resume path

def _drop_weight(c):
    c["model"].pop("transformer.wte.weight")


MALFORMED = [
    (_drop_weight, "1 weight tensor(s) are not this model's float32 tensors (the first: transformer.wte.weight, "
                   "missing"),
    (lambda c: c.update(optimizer=None), "'optimizer' is a NoneType"),
    (lambda c: c.pop("log"), "no 'log' entry"),
    (lambda c: c.pop("step"), "no 'step' entry"),
    (lambda c: c.update(step="8"), "'step' is a str, not an int"),
    (lambda c: c.update(results=[]), "'results' is a list, not a dict"),
    (lambda c: c.pop("rng_ranks"), "no 'rng_ranks' entry"),
    (lambda c: c.update(stage="sftkey_tag"), "stage sftkey_tag in the folder sft_tag"),
]


@pytest.mark.parametrize("spoil, problem", MALFORMED, ids=[p for _, p in MALFORMED])
def test_malformed_checkpoint_on_resume_is_one_clean_line(made, tmp_path, capsys, monkeypatch, spoil, problem):
    out = copy(made["interrupted"], tmp_path / "out")
    path = out / "sft_tag" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    spoil(ckpt)
    torch.save(ckpt, path)
    no_training(monkeypatch)
    code, err = main(flags(out, made["data"], "--resume"), capsys)
    one_line_error(code, err, f"error: {path}", problem)


# ---------------------------------------------------------------------------------------------
# Item 9: --resume with nothing to resume; checkpoints by wall time by default

def test_resume_without_a_checkpoint_says_so(made, tmp_path, capsys):
    out = tmp_path / "typo"
    code, err = main(flags(out, made["data"], "--resume", "--max_iters", "2", "--stage2_iters", "0"), capsys)
    assert code == 0, err
    assert f"--resume: no checkpoint in {out}: starting from step 0" in err
    assert torch.load(out / "sft_tag" / "ckpt.pt", weights_only=True)["step"] == 2


def test_resume_without_a_checkpoint_starts_a_fresh_log(made, tmp_path, capsys):
    """A run killed before its first checkpoint leaves log.jsonl (and maybe loss.png) alone: --resume starts from
    step 0, with any flags, so those rows would pass for this run's. They are deleted, and the log is this run's."""
    out = tmp_path / "killed"
    out.mkdir()
    stale = [{"stage": "sft_tag", "step": s, "lr": 2e-3, "loss": 0.3, "tokens_per_s": 1.0} for s in range(800)]
    (out / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in stale))
    (out / "loss.png").write_bytes(b"not this run's")
    code, err = main(flags(out, made["data"], "--resume", "--max_iters", "2", "--stage2_iters", "0"), capsys)
    assert code == 0, err
    assert f"starting from step 0 (deleted {out / 'log.jsonl'}, {out / 'loss.png'})" in err
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    logged = json.loads((out / "results.json").read_text())["log"]
    assert [r for r in rows if "results" not in r] == logged and not (out / "loss.png").exists()

    # results.json is written last: with no checkpoint it is a finished run's (an --eval_only one's), kept as from
    # a fresh run (found in review: the first version of this fix deleted it).
    finished = tmp_path / "evaluated"
    finished.mkdir()
    (finished / "results.json").write_text('{"results": {"init": {}}}')
    (finished / "log.jsonl").write_text("")
    code, err = main(flags(finished, made["data"], "--resume", "--max_iters", "2", "--stage2_iters", "0"), capsys)
    one_line_error(code, err, f"holds the files of an earlier run ({finished / 'results.json'}): delete them with "
                              f"--overwrite")
    assert (finished / "results.json").read_text() == '{"results": {"init": {}}}' and (finished / "log.jsonl").exists()


@pytest.mark.parametrize("seconds, written", [(300.0, False), (0.0, True)])
def test_default_interval_writes_by_wall_time(made, tmp_path, monkeypatch, seconds, written):
    """--ckpt_interval 0: a checkpoint once AUTO_CKPT_SECONDS have passed since the last (0 here: every
    step), so a kill -9 in step 5 keeps step 5; the control, at 300 s, keeps nothing."""
    monkeypatch.setattr(checkpoints, "AUTO_CKPT_SECONDS", seconds)
    kill_at(monkeypatch, 5)
    with pytest.raises(Killed):
        train.run(train.parse_args(flags(tmp_path / "out", made["data"], "--ckpt_interval", "0")))
    ckpt = tmp_path / "out" / "sft_tag" / "ckpt.pt"
    assert ckpt.exists() == written
    if written:
        assert torch.load(ckpt, weights_only=True)["step"] == 5


def test_auto_interval_follows_the_clock(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(checkpoints.time, "time", lambda: clock[0])
    cfg = train.parse_args(["--out_dir", str(tmp_path), "--ckpt_interval", "0"])
    stage = checkpoints.StageCheckpoint(None, cfg, "sft_tag", [])
    clock[0] += checkpoints.AUTO_CKPT_SECONDS - 1
    assert not stage.due(3, 10)
    clock[0] += 2
    assert stage.due(4, 10) and not stage.due(10, 10)  # the stage's end writes anyway
    stage.save(4, None, None)  # no path: writes nothing, restarts the clock
    assert not stage.due(5, 10)
    every_3 = checkpoints.StageCheckpoint(None, train.dataclasses.replace(cfg, ckpt_interval=3), "sft_tag", [])
    assert [n for n in range(1, 10) if every_3.due(n, 9)] == [3, 6]


# ---------------------------------------------------------------------------------------------
# Item 13: durability

def test_writes_are_fsynced_file_then_folder(tmp_path, monkeypatch):
    cfg = train.parse_args(["--out_dir", str(tmp_path)])
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=1, n_embd=8))
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoints.save_checkpoint(str(tmp_path / "ckpt.pt"), model, None, cfg, step=1)
    checkpoints.write_json(str(tmp_path / "results.json"), {})
    assert events == ["file", "rename", "folder"] * 2


# ---------------------------------------------------------------------------------------------
# Found in review: ranks, --eval_only, --overwrite of the start checkpoint, --resume with --overwrite

def test_resume_refuses_another_number_of_ranks(made, tmp_path):
    """The ranks set the batch (--batch_size x --grad_accum x ranks): a 1-process checkpoint resumed by 2 is
    another run, though every flag is the same."""
    out = copy(made["interrupted"], tmp_path / "out")
    cfg = train.parse_args(flags(out, made["data"], "--resume"))
    shape, hashes = checkpoints.model_config(cfg, D.get_encoding(cfg.encoding)), checkpoints.read_inputs(cfg).sha256
    path = str(out / "sft_tag" / "ckpt.pt")
    checkpoints.check_resume(path, cfg, shape, 1, hashes)  # the same: accepted
    with pytest.raises(ValueError, match=r"ranks: 1 in the checkpoint, 2 here \(they set the batch"):
        checkpoints.check_resume(path, cfg, shape, 2, hashes)


def test_resume_refuses_fewer_ranks_than_the_checkpoint_had(made, tmp_path):
    """The other way round: a 2-rank checkpoint (two RNG states) resumed by 1 process is another run too."""
    out = copy(made["interrupted"], tmp_path / "out")
    cfg = train.parse_args(flags(out, made["data"], "--resume"))
    shape, hashes = checkpoints.model_config(cfg, D.get_encoding(cfg.encoding)), checkpoints.read_inputs(cfg).sha256
    path = out / "sft_tag" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["world"], ckpt["rng_ranks"] = 2, ckpt["rng_ranks"] * 2
    torch.save(ckpt, path)
    checkpoints.check_resume(str(path), cfg, shape, 2, hashes)  # the same: accepted
    with pytest.raises(ValueError, match=r"ranks: 2 in the checkpoint, 1 here"):
        checkpoints.check_resume(str(path), cfg, shape, 1, hashes)


def test_eval_only_writes_only_into_a_folder_of_its_own(made, tmp_path, capsys):
    """--eval_only writes results.json: a folder holding a run's checkpoints (finished or interrupted) is
    another run's, refused with --overwrite too (it would make that run unresumable)."""
    evaluate = ["--eval_only", "--init_from", str(made["finished"] / "sft_tag" / "ckpt.pt"), "--eval_data",
                str(made["data"]), "--eval_limit", "2"]
    for run in ("finished", "interrupted"):
        out = copy(made[run], tmp_path / run)
        (out / "results.json").unlink(missing_ok=True)
        before = digests(out)
        for extra in ([], ["--overwrite"]):
            code, err = main(flags(out, made["data"], *evaluate, *extra), capsys)
            one_line_error(code, err, "holds files this run does not write", str(out / "sft_tag" / "ckpt.pt"))
            assert digests(out) == before
    code, err = main(flags(tmp_path / "eval", made["data"], *evaluate), capsys)
    assert code == 0, err
    assert "init" in json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    code, err = main(flags(tmp_path / "eval", made["data"], *evaluate), capsys)  # a second one would replace it
    one_line_error(code, err, "holds the files of an earlier run", "results.json")


def test_a_stage_folder_of_another_run_is_refused_and_its_temporaries_are_kept(made, tmp_path, capsys, monkeypatch):
    """Review (attack): --out_dir set to another run's stage folder (out/sft_tag, holding its ckpt.pt) was taken: the
    new run wrote beside that checkpoint, which made the first run's --resume refuse its own folder; and a take
    deleted every .ckpt.pt.*.tmp in a folder of its plan, there the first run's checkpoint being written."""
    out = copy(made["interrupted"], tmp_path / "out")
    stage = out / "sft_tag"
    before = digests(out)
    no_training(monkeypatch)
    code, err = main(flags(stage, made["data"]), capsys)
    one_line_error(code, err, "holds files this run does not write", str(stage / "ckpt.pt"))
    assert digests(out) == before
    (stage / "ckpt.pt").unlink()  # before the first run's first checkpoint: its temporary, half written
    (stage / ".ckpt.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    with checkpoints.RunFolder(str(stage)) as folder:
        folder.take([("results.json",), ("sft_tag", "ckpt.pt")])
    assert (stage / ".ckpt.pt.abc123.tmp").read_bytes() == b"half a checkpoint"


def test_a_stage_name_too_long_is_named_as_such_before_the_folder_is_made(tmp_path):
    """Review (attack): chained --init_from runs with spelled-out weights reach stage names over NAME's 100
    characters; the refusal spoke only of the characters allowed, and came after the lock had made --out_dir."""
    out = tmp_path / "new"
    with checkpoints.RunFolder(str(out)) as folder, pytest.raises(ValueError, match="at most 100 characters"):
        folder.take([("results.json",), ("w" * 101, "ckpt.pt")])
    assert not out.exists()


def test_overwrite_never_deletes_the_checkpoint_the_run_starts_from(made, tmp_path, capsys, monkeypatch):
    """The --init_from checkpoint in --out_dir, a file the run reads: the folder is refused, naming it."""
    out = copy(made["finished"], tmp_path / "out")
    before = digests(out)
    no_training(monkeypatch)
    start = ["--overwrite", "--init_from", str(out / "sft_tag" / "ckpt.pt")]
    code, err = main(flags(out, made["data"], *start, "--stage2_iters", "0"), capsys)
    one_line_error(code, err, f"--init_from {out / 'sft_tag' / 'ckpt.pt'} is the run file", "the run would replace")
    assert digests(out) == before


def test_overwrite_knows_the_start_checkpoint_however_its_path_is_spelled(tmp_path, monkeypatch):
    """--init_from given relative to the current folder (or through another spelling) names the same file as
    --out_dir/sft_tag/ckpt.pt: --overwrite refuses to delete it, and it is left as it was."""
    out = tmp_path / "out"
    (out / "sft_tag").mkdir(parents=True)
    (out / "sft_tag" / "ckpt.pt").write_bytes(b"the start checkpoint")
    monkeypatch.chdir(out)
    folder = checkpoints.RunFolder(str(out), overwrite=True, flags={"init_from": os.path.join("sft_tag", "ckpt.pt")})
    with folder, pytest.raises(ValueError, match="--init_from sft_tag/ckpt.pt is the run file .*sft_tag/ckpt.pt"):
        folder.take([("sft_tag", "ckpt.pt"), ("results.json",)])
    assert (out / "sft_tag" / "ckpt.pt").read_bytes() == b"the start checkpoint"


def test_resume_with_overwrite_is_refused_before_anything_is_written(made, tmp_path, capsys):
    out = tmp_path / "new"
    code, err = main(flags(out, made["data"], "--resume", "--overwrite"), capsys)
    one_line_error(code, err, "--resume continues the run", "--overwrite deletes it")
    assert not out.exists()


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_the_repository_ships_no_run_folder():
    """A checkpoint committed by mistake (out/sft_tag/ckpt.pt once was) makes a fresh clone's first
    `python train.py` refuse its own default --out_dir as another run's folder."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    shipped = [f for f in tracked.splitlines() if f.startswith("out/") or f.endswith((".pt", ".lock"))]
    assert not shipped, shipped
