"""Checkpoint files for train.py: atomic writes, safe reads, resume state, one run per folder, GPT-2's weights.

Nothing here is SFTKey: a reader of the method can skip this file. It holds
- `atomic_write` (and `write_text`, `write_json`, `save_checkpoint` through it): a unique temporary
  file (mkstemp: never a planted name or link), fsync'ed, renamed, folder fsync'ed, so an interrupted
  write, a full disk or a power loss leaves the previous file intact; a failure is a `WriteError`;
- `read_checkpoint` / `load_checkpoint`: `torch.load(weights_only=True)` (a checkpoint never runs
  code), with one clear message for a foreign, truncated or mismatched file;
- `StageCheckpoint`: the one hook the training loop calls to resume a stage and to write its
  checkpoints (every --ckpt_interval steps, by default every AUTO_CKPT_SECONDS, and on a stop signal);
- `RunFolder` (`FolderLock` + `prepare_out_dir`): one run per --out_dir, checked before training:
  writable, not another run's files (`--overwrite` deletes them), and on --resume only checkpoints
  of the same flags and input files (`resume_mismatches`) with everything resuming needs
  (`check_resume_checkpoint`);
- `gpt2_from_hf`: GPT-2 from a Hugging Face checkpoint folder, converted to model.py's names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import pickle
import re
import socket
import sys
import tempfile
import time
import warnings
from typing import BinaryIO, Callable

import torch

try:
    import fcntl
except ImportError:  # Windows: FolderLock says it cannot lock
    fcntl = None

from model import GPT, GPTConfig
from runtime import PRETRAINED, Dist, Interrupted, StopSignal

# The flag that sets each model-config field, to name it when a checkpoint does not match.
_CONFIG_FLAGS = {"vocab_size": "--encoding", "block_size": "--block_size", "n_layer": "--n_layer",
                 "n_head": "--n_head", "n_embd": "--n_embd", "dropout": "--dropout"}


class WriteError(OSError):
    """A file could not be written (disk full, I/O error): the message says which file and why; the
    file that was there before, if any, is intact and no temporary file is left behind."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" in front
        return str(self.strerror)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


_UMASK = _umask()


class _Recording(io.RawIOBase):
    """A write-only file that remembers the first OSError of a write: torch.save's zip writer reports a
    failed write only as "unexpected pos", and the real cause (ENOSPC, EIO) is what the user needs."""

    def __init__(self, f):
        super().__init__()
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise


def _fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failure(path: str, err: BaseException, recorded: OSError | None) -> WriteError:
    """One message for a failed write: which file, whether the disk is full, what is left."""
    cause = recorded or err
    full_errnos = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
    full = isinstance(cause, OSError) and cause.errno in full_errnos
    try:
        stat = os.statvfs(os.path.dirname(path) or ".")
        full = full or stat.f_bavail * stat.f_frsize < 1 << 20  # torch's own error ("unexpected pos") says less
    except (OSError, AttributeError):
        pass
    before = "the previous file there is intact" if os.path.exists(path) else "nothing was written there"
    detail = str(cause).splitlines()[0] if str(cause) else "no details"
    what = "the disk is full" if full else "the write failed"
    code = getattr(cause, "errno", None) or errno.EIO
    return WriteError(code, f"could not write {path}: {what} ({type(cause).__name__}: {detail}); {before}, and the "
                            f"partial temporary file was removed")


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` whole or not at all, durably.

    `write(f)` fills a new temporary file made by tempfile.mkstemp in the same folder (O_EXCL: a name
    that exists, or a planted symlink, is never opened, and two writers never share a temporary);
    the file is fsync'ed, renamed over `path` and the folder fsync'ed, so neither a crash nor a power
    loss leaves a torn file or loses the previous one. On any failure the temporary file is removed
    and an OSError or torch's RuntimeError becomes a WriteError naming the file and the cause.
    """
    folder = os.path.dirname(path) or "."
    tmp, recording = None, None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it 0600: give it the mode open() would have
        with open(fd, "wb", buffering=0) as raw:
            recording = _Recording(raw)
            with io.BufferedWriter(recording) as f:
                write(f)
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(folder)
    except (OSError, RuntimeError) as err:
        raise _write_failure(path, err, recording.error if recording else None) from None
    finally:
        if tmp is not None:  # failed or interrupted (KeyboardInterrupt too) before the rename
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_text(path: str, text: str) -> None:
    """Written whole or not at all (see atomic_write), as UTF-8."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


def save_checkpoint(path: str, model: GPT, optimizer, cfg, step: int, extra: dict | None = None) -> None:
    """Tensors and plain values only (loadable with weights_only=True), written atomically and durably
    (atomic_write): a crash, a full disk or a power loss mid-write leaves the previous checkpoint intact.
    The RNG states (CPU and every CUDA device) go in too, so a run with dropout resumes exactly; the
    flags and the sha256 of every input file (`file_hashes`) let --resume refuse another run's file."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
             "model_config": dataclasses.asdict(model.config), "train_config": dataclasses.asdict(cfg),
             "file_hashes": file_hashes(cfg), "step": step, **rng_state(), **(extra or {})}
    atomic_write(path, lambda f: torch.save(state, f))


def rng_state() -> dict:
    """The CPU and CUDA RNG states, as a checkpoint holds them (restore_rng puts them back)."""
    # CUDA's only once it is in use: asking earlier would start a CUDA context in a CPU run
    return {"rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def restore_rng(ckpt: dict) -> None:
    """The CPU and CUDA RNG states a checkpoint holds (read with map_location, they may sit on a GPU:
    the setters want CPU tensors). States of GPUs this machine lacks are left out."""
    torch.set_rng_state(ckpt["rng"].cpu())
    if ckpt.get("cuda_rng") and torch.cuda.is_available():
        for index, state in enumerate(ckpt["cuda_rng"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), index)


def read_checkpoint(path: str, expected: GPTConfig | None, device: str, encoding: str | None = None,
                    exact_vocab: int | None = None, mmap: bool = False) -> dict:
    """A checkpoint's contents, after checking its model shape (and `encoding`, if given) matches the flags.

    A checkpoint whose vocabulary is `exact_vocab` (the encoding's own size, not rounded up: one
    trained from GPT-2's weights) is accepted as well as the rounded size `expected` holds.

    Loading never runs code: torch.load with weights_only=True accepts tensors and plain Python
    values only, and anything else is refused with a ValueError naming the file and the problem.
    `mmap` maps the tensors instead of reading them (a cheap look at a checkpoint on the CPU).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol draws a warning; the refusal below says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)  # never unpickle code
    except pickle.UnpicklingError as err:  # weights_only met something other than tensors and plain values
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(f"{path}: refused to load: it holds a pickled Python object{what} that is not a tensor or "
                         f"a plain value, and unpickling it could run code. Only checkpoints holding tensors and "
                         f"plain values, as this project writes them, are loaded.") from None
    except Exception as err:  # a truncated or foreign file: the loader's own errors say little
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no details'})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_config"), dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not an sftkey checkpoint (no 'model' and 'model_config' entries)")
    try:
        saved = GPTConfig(**ckpt["model_config"])
    except TypeError as err:
        raise ValueError(f"{path}: its model_config does not describe this project's GPT ({err})") from None
    expected = expected or saved  # None: no shape to compare with
    if exact_vocab is not None and saved.vocab_size == exact_vocab:
        expected = dataclasses.replace(expected, vocab_size=exact_vocab)
    diffs = [f"{_CONFIG_FLAGS.get(k, k)}: {k}={getattr(saved, k)} in the checkpoint but {getattr(expected, k)} here"
             for k in vars(saved) if getattr(saved, k) != getattr(expected, k)]
    trained_with = (ckpt.get("train_config") or {}).get("encoding")
    if encoding is not None and trained_with is not None and trained_with != encoding:
        diffs.append(f"--encoding: {trained_with} in the checkpoint but {encoding} here")
    if diffs:
        raise ValueError(f"{path} does not match the flags: " + "; ".join(diffs))
    return ckpt


def load_checkpoint(path: str, expected: GPTConfig, device: str, encoding: str | None = None,
                    exact_vocab: int | None = None) -> tuple[GPT, dict]:
    """A model with a checkpoint's weights (see read_checkpoint for the checks), and the checkpoint."""
    ckpt = read_checkpoint(path, expected, device, encoding, exact_vocab)
    model = GPT(GPTConfig(**ckpt["model_config"])).to(device)  # equal to `expected` but perhaps its vocabulary
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as err:  # missing, extra or misshapen tensors
        detail = " ".join(str(err).split())
        raise ValueError(f"{path}: its weights do not fit the model ({detail[:300]})") from None
    return model, ckpt




def model_config(cfg, enc) -> GPTConfig:
    """The shape the flags ask for, the vocabulary rounded up to a multiple of 64 (efficient matmuls)."""
    return GPTConfig(64 * math.ceil(enc.n_vocab / 64), cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                     cfg.dropout)


def build_model(cfg, enc, device: str) -> GPT:
    """Random weights, an --init_from checkpoint's, or GPT-2's (--init_from gpt2:DIR, which keeps GPT-2's
    shape and its 50,257-token vocabulary, as do checkpoints trained from it)."""
    if cfg.init_from.startswith(PRETRAINED):
        return load_gpt2(cfg.init_from, enc, cfg.block_size, cfg.dropout).to(device)
    if cfg.init_from:
        return load_checkpoint(cfg.init_from, model_config(cfg, enc), device, cfg.encoding, enc.n_vocab)[0]
    return GPT(model_config(cfg, enc)).to(device)


def init_origin(cfg) -> tuple[str, int]:
    """The stage an --init_from checkpoint ended and its position in the data stream (steps read), so a
    stage run by hand from it is named by its history and reads on where it stopped; ("", 0) otherwise."""
    if not cfg.init_from or cfg.init_from.startswith(PRETRAINED):
        return "", 0
    try:
        ckpt = read_checkpoint(cfg.init_from, None, "cpu", mmap=True)  # a cheap look: the tensors stay on disk
    except ValueError:  # a legacy (not zip) file cannot be mapped: read it whole, or say what is wrong with it
        ckpt = read_checkpoint(cfg.init_from, None, "cpu")
    stage, start, step = ckpt.get("stage", ""), ckpt.get("stream_start", 0), ckpt.get("step", 0)
    if not (isinstance(stage, str) and isinstance(start, int) and isinstance(step, int)):
        raise ValueError(f"{cfg.init_from}: its stage, stream_start or step entry is not a name or a number")
    return stage, start + step


# --ckpt_interval 0: write a checkpoint after the first step that ends this many seconds after the
# last write. A write of the default model costs milliseconds (see the README), invisible at this rate.
AUTO_CKPT_SECONDS = 300.0


class StageCheckpoint:
    """One stage's checkpoint as the training loop sees it: what to resume from, when to write.

    `saved` is this stage's checkpoint when resuming (optimizer, step and RNG are restored from it);
    `extra` is stored in every write (what run() needs to resume the stages around this one). With
    no `path` nothing is written (experiment.py's arms).
    """

    def __init__(self, path: str | None, cfg, stage: str, log: list[dict], saved: dict | None = None,
                 extra: dict | None = None, stop: StopSignal | None = None, dist: Dist | None = None):
        self.path, self.cfg, self.stage, self.log, self.saved = path, cfg, stage, log, saved
        self.extra, self.stop, self.dist = extra or {}, stop, dist or Dist()
        self.start = time.time() - (saved.get("elapsed", 0.0) if saved else 0.0)
        self.last_write = time.time()

    def restore(self, optimizer: torch.optim.Optimizer) -> int:
        """The step to start from: 0, or the saved one with the optimizer and RNG as they were."""
        if self.saved is None:
            return 0
        optimizer.load_state_dict(self.saved["optimizer"])
        restore_rng(self.saved)
        return self.saved["step"]

    def elapsed(self) -> float:
        """Seconds of training in this stage, interrupted runs included."""
        return time.time() - self.start

    def save(self, step: int, model: GPT, optimizer) -> None:
        if self.path and self.dist.master:
            save_checkpoint(self.path, model, optimizer, self.cfg, step, {"stage": self.stage, "log": self.log,
                            "world": self.dist.world, **self.extra, "elapsed": self.elapsed()})
        self.last_write = time.time()

    def due(self, done: int, iters: int) -> bool:
        """Whether to write after step `done`: every --ckpt_interval steps, or with --ckpt_interval 0
        (the default) once AUTO_CKPT_SECONDS of wall time have passed since the last write, so a kill -9
        loses minutes, not a stage. Never after the last step: the stage's end writes anyway. The
        decision may differ between ranks; only rank 0 writes, with no collective, so that is harmless."""
        if done >= iters:
            return False
        if self.cfg.ckpt_interval:
            return done % self.cfg.ckpt_interval == 0
        return time.time() - self.last_write >= AUTO_CKPT_SECONDS

    def after_step(self, done: int, iters: int, model: GPT, optimizer) -> None:
        """Write when `due`; on a stop signal write, then raise Interrupted."""
        stopping = self.stop is not None and self.stop.requested(self.dist)
        if stopping or self.due(done, iters):
            self.save(done, model, optimizer)
        if stopping:
            raise Interrupted(f"{self.stage} stopped by signal after step {done} of {iters}; checkpoint written "
                              f"to {self.path}. Resume with the same command and --resume.")


# ---------------------------------------------------------------------------------------------
# One run per folder: what a run is, the checks before training, the lock

TMP_SUFFIX = ".tmp"  # atomic_write's temporaries: .NAME.<random>.tmp beside NAME
LOCK_NAME = ".sftkey.lock"
CKPT_NAME, RESULTS_NAME = "ckpt.pt", "results.json"

# TrainConfig fields that may differ on --resume: they cannot change the weights or the results.
# Every other field, including any added later, must match: the rule is an allow-list, so a new
# flag is compared until someone decides it is neutral and says why here.
RESULT_NEUTRAL = {
    "out_dir": "where the files are (a folder may be moved, then resumed)",
    "resume": "how the run starts, not what it computes",
    "overwrite": "idem",
    "log_interval": "how often a log line is printed (no weight or RNG state is touched)",
    "eval_interval": "how often the validation loss is measured (in eval mode: no RNG drawn)",
    "eval_batch_size": "how many prompts are generated together (each row is independent of the others)",
    "ckpt_interval": "how often checkpoints are written",
    # Where and how the same arithmetic runs. A run may be finished on another machine; the result
    # is then a valid continuation but not bitwise the uninterrupted run's (rounding differs, and
    # dropout draws from the CUDA generator on a GPU). --dtype is compared: it is a numeric choice
    # of the experiment (bfloat16 matmuls), not a place. (--dtype auto is compared as written.)
    "device": "where the run computes (rounding differs, see above)",
    "compile": "the same model, fused (rounding differs)",
}


def _show(value) -> str:
    return "(empty)" if value == "" else str(value)


_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256: each file is read once per process


def _sha256(path: str) -> str:
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def file_hashes(cfg) -> dict[str, str]:
    """The sha256 of each input file the flags name, by flag: --data, --eval_data, a .tiktoken
    --encoding and an --init_from checkpoint. Another file at the same path (an edited dataset) is
    another run; a size and a modification time would not tell. (--init_from gpt2:DIR is compared
    by its path only.)"""
    encoding = cfg.encoding if cfg.encoding.endswith(".tiktoken") or os.path.sep in cfg.encoding else ""
    init_from = "" if cfg.init_from.startswith(PRETRAINED) else cfg.init_from
    named = {"--data": getattr(cfg, "data", ""), "--eval_data": getattr(cfg, "eval_data", ""),
             "--encoding": encoding, "--init_from": init_from}
    return {flag: _sha256(path) for flag, path in named.items() if path and os.path.isfile(path)}


def resume_mismatches(ckpt: dict, cfg, files: bool = True) -> list[str]:
    """What differs between the run that wrote `ckpt` and the flags `cfg`, one entry per flag with
    both values: every TrainConfig field but RESULT_NEUTRAL's, then (with `files`) the input files'
    contents. A checkpoint whose step lies beyond --max_iters differs in --max_iters."""
    saved, here = ckpt.get("train_config"), dataclasses.asdict(cfg)
    if not isinstance(saved, dict):
        return ["the checkpoint records no flags (train_config)"]
    diffs = []
    for name in [*here, *(k for k in saved if k not in here)]:
        if name in RESULT_NEUTRAL:
            continue
        if name not in saved:
            diffs.append(f"--{name}: not recorded in the checkpoint (written before the flag existed), "
                         f"{_show(here[name])} here")
        elif name not in here:
            diffs.append(f"--{name}: {_show(saved[name])} in the checkpoint, no such flag here")
        elif saved[name] != here[name]:
            diffs.append(f"--{name}: {_show(saved[name])} in the checkpoint, {_show(here[name])} here")
    saved_files = ckpt.get("file_hashes")
    saved_files = saved_files if isinstance(saved_files, dict) else {}
    for flag, digest in file_hashes(cfg).items() if files else ():
        if flag[2:] in saved and saved[flag[2:]] != here[flag[2:]]:
            continue  # another path: named above
        if saved_files.get(flag) != digest:
            was = f"sha256 {saved_files[flag][:12]}…" if flag in saved_files else "not recorded"
            diffs.append(f"{flag} {here[flag[2:]]}: other contents ({was} in the checkpoint, "
                         f"sha256 {digest[:12]}… here)")
    return diffs


_RESUME_ENTRIES = {"step": int, "log": list, "results": dict, "seconds": dict, "stage": str,
                   "rng": torch.Tensor, "cuda_rng": list}


def check_resume_checkpoint(ckpt: dict, path: str) -> None:
    """Refuse, with one ValueError naming the file and every problem, a checkpoint (already read by
    read_checkpoint) that --resume could not continue from: weights that do not fit its own model
    config, no optimizer state, or a missing or mistyped step, log, results, RNG state or stage name."""
    problems = []
    with torch.device("meta"):  # shapes only, no memory
        reference = GPT(GPTConfig(**ckpt["model_config"]))
    weights = ckpt["model"] if isinstance(ckpt["model"], dict) else {}
    if not isinstance(ckpt["model"], dict):
        problems.append(f"'model' is a {type(ckpt['model']).__name__}, not a dict of tensors")
    expected = reference.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misshapen = [k for k in expected if k in weights and
                 (not isinstance(weights[k], torch.Tensor) or weights[k].shape != expected[k].shape)]
    for what, names in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
        if names:
            problems.append(f"{len(names)} {what} weight tensor(s) ({', '.join(names[:3])})")
    optimizer = ckpt.get("optimizer")
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) or not isinstance(groups, list):
        problems.append(f"no optimizer state ('optimizer' is {type(optimizer).__name__})")
    elif sum(len(g.get("params", [])) if isinstance(g, dict) else 0 for g in groups) != len(
            list(reference.parameters())):
        problems.append("its optimizer state is not for this model's parameters")
    for key, kind in _RESUME_ENTRIES.items():
        if key not in ckpt:
            problems.append(f"no '{key}' entry")
        elif not isinstance(ckpt[key], kind) or (kind is int and isinstance(ckpt[key], bool)):
            article = "an" if kind.__name__[0] in "aeiou" else "a"
            problems.append(f"'{key}' is a {type(ckpt[key]).__name__}, not {article} {kind.__name__}")
    if isinstance(ckpt.get("step"), int) and ckpt["step"] < 0:
        problems.append(f"'step' is {ckpt['step']}")
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if isinstance(ckpt.get("stage"), str) and ckpt["stage"] != folder:
        problems.append(f"it is stage {ckpt['stage']}'s checkpoint, found in the folder {folder}")
    if problems:
        raise ValueError(f"{path}: not a checkpoint --resume can continue from: {'; '.join(problems)}")


def run_files(out_dir: str) -> list[str]:
    """The files in `out_dir` that make it a run's folder: every STAGE/ckpt.pt and results.json."""
    if not os.path.isdir(out_dir):
        return []
    found = sorted(os.path.join(out_dir, name, CKPT_NAME) for name in os.listdir(out_dir)
                   if os.path.isfile(os.path.join(out_dir, name, CKPT_NAME)))
    results = os.path.join(out_dir, RESULTS_NAME)
    return found + ([results] if os.path.isfile(results) else [])


def _unwritable(out_dir: str, problems: list[str]) -> ValueError:
    return ValueError(f"--out_dir {out_dir}: the run could not write its files there: {'; '.join(problems)}. "
                      f"Nothing was trained; fix this or choose another --out_dir")


def _probe(folder: str) -> str | None:
    """Why a file cannot be created in `folder` (None: it can), found by creating one."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".sftkey-probe.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        return f"cannot create files in {folder} ({err.strerror or err})"
    return None


def check_writable(out_dir: str, stages: list[str]) -> None:
    """Every path the run writes, checked before training: out_dir (created here if absent, as the
    lock needs it), out_dir/STAGE/, out_dir/STAGE/ckpt.pt, out_dir/results.json. A stage folder that
    does not exist yet is not created (an interrupted run leaves no empty folders): that it can be
    made follows from out_dir being writable. One ValueError lists every problem."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:  # a read-only file system, a path under a file, no permission
        raise _unwritable(out_dir, [f"cannot create {out_dir} ({err.strerror or err})"]) from None
    problems = [p for p in [_probe(out_dir)] if p]
    targets = [(os.path.join(out_dir, stage), os.path.join(out_dir, stage, CKPT_NAME)) for stage in stages]
    for folder, ckpt in targets:
        if os.path.lexists(folder) and not os.path.isdir(folder):
            problems.append(f"{folder} is a file, not a folder")
        elif os.path.isdir(folder):
            problems += [p for p in [_probe(folder)] if p]
            if os.path.isdir(ckpt):
                problems.append(f"{ckpt} is a folder, not a file")
    results = os.path.join(out_dir, RESULTS_NAME)
    if os.path.isdir(results):
        problems.append(f"{results} is a folder, not a file")
    if problems:
        raise _unwritable(out_dir, problems)


def _remove_leftover_temporaries(out_dir: str, stages: list[str]) -> None:
    """Temporary files of writes killed mid-way (kill -9), by atomic_write's own naming: with the
    folder locked no other writer can own them."""
    for folder, name in [(out_dir, RESULTS_NAME), *((os.path.join(out_dir, s), CKPT_NAME) for s in stages)]:
        if os.path.isdir(folder):
            for entry in os.listdir(folder):
                if entry.startswith(f".{name}.") and entry.endswith(TMP_SUFFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(folder, entry))


def prepare_out_dir(cfg, stages: list[str], expected: GPTConfig | None = None, world: int = 1) -> None:
    """The checks of --out_dir before training (call it with the folder locked, after the flags and
    the data were checked, so bad input still writes nothing):

    - every path the run writes can be written (check_writable);
    - a fresh run refuses a folder holding another run's files (any STAGE/ckpt.pt or results.json)
      unless --overwrite, which deletes exactly those files first, nothing else;
    - --resume accepts only checkpoints of this run: each one found (finished stages included) is
      read, its contents checked (check_resume_checkpoint) and its flags and input files compared
      (resume_mismatches), the number of ranks too (it sets the batch: --batch_size x --grad_accum x
      ranks); a folder with no checkpoint starts from step 0 with a note saying so.
    `expected` is the model's config, checked against the checkpoints' (read_checkpoint). --eval_only
    writes only results.json, so only that counts as an earlier run's file for it, and --overwrite
    never deletes the --init_from checkpoint the run starts from.
    """
    out, overwrite = cfg.out_dir, getattr(cfg, "overwrite", False)
    check_writable(out, stages)
    _remove_leftover_temporaries(out, stages)
    found = [p for p in run_files(out) if p.endswith(RESULTS_NAME) or not getattr(cfg, "eval_only", False)]
    if not cfg.resume:
        start = [p for p in found if os.path.isfile(cfg.init_from) and os.path.samefile(p, cfg.init_from)]
        if start and overwrite:
            raise ValueError(f"--overwrite would delete {start[0]}, the --init_from checkpoint this run starts from: "
                             f"copy it elsewhere first, or choose another --out_dir")
        if found and not overwrite:
            raise ValueError(f"--out_dir {out} holds the files of an earlier run ({', '.join(found)}): continue it "
                             f"with --resume (and the same flags), delete those files with --overwrite, or choose "
                             f"another --out_dir")
        for path in found:
            os.unlink(path)
        if found:
            print(f"--overwrite: deleted {', '.join(found)}", file=sys.stderr, flush=True)
        return
    checkpoints = [path for path in found if path.endswith(CKPT_NAME)]
    if not checkpoints:
        print(f"--resume: no checkpoint in {out} (no {os.path.join(out, 'STAGE', CKPT_NAME)}): starting from step 0",
              file=sys.stderr, flush=True)
    for path in checkpoints:
        ckpt = read_checkpoint(path, expected, "cpu", cfg.encoding, mmap=True)
        check_resume_checkpoint(ckpt, path)
        diffs = resume_mismatches(ckpt, cfg)
        if ckpt.get("world", 1) != world:
            diffs.append(f"ranks: {ckpt.get('world', 1)} in the checkpoint, {world} here (they set the batch, "
                         f"--batch_size x --grad_accum x ranks)")
        if diffs:
            raise ValueError(f"{path} was written by another run: {'; '.join(diffs)}. Resume with the flags it was "
                             f"written with, start afresh with --overwrite (deletes that run's files), or choose "
                             f"another --out_dir")
    results = os.path.join(out, RESULTS_NAME)
    config = _results_config(results) if results in found else None
    diffs = resume_mismatches({"train_config": config}, cfg, files=False) if config is not None else []
    if diffs:
        raise ValueError(f"{results} was written by another run: {'; '.join(diffs)}. Resume with the flags it was "
                         f"written with, start afresh with --overwrite, or choose another --out_dir")


def _results_config(path: str) -> dict | None:
    """The flags a results.json records (None if it is unreadable or not this project's)."""
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary.get("config") if isinstance(summary, dict) and isinstance(summary.get("config"), dict) else None


class FolderLock:
    """An exclusive lock on a run folder for the run's life (a context manager).

    fcntl.flock on out_dir/.sftkey.lock: the kernel releases it when the holder's process ends, however
    it ends (kill -9 included), so a dead run never blocks the folder, and no pid guesswork decides
    whether a holder is alive. The file holds "pid host" to name the holder: a second run refuses at
    once with a ValueError naming them; a file left by a process that no longer holds the lock is
    taken over with a one-line note. The file is removed on release. Where fcntl is missing
    (Windows) there is no lock, and a note says so.
    """

    def __init__(self, out_dir: str):
        self.out_dir, self.path, self.fd = out_dir, os.path.join(out_dir, LOCK_NAME), None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _read_holder(self, fd: int) -> str:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode("utf-8", "replace").strip()

    def acquire(self) -> None:
        if fcntl is None:
            print(f"note: no file locking on this system: nothing stops a second run in {self.out_dir}",
                  file=sys.stderr, flush=True)
            return
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except OSError as err:  # a read-only file system, a path under a file, no permission
            raise _unwritable(self.out_dir, [f"cannot create {self.out_dir} ({err.strerror or err})"]) from None
        while True:
            try:  # O_NOFOLLOW: a symlink planted at the lock's name is refused, never followed
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as err:
                raise _unwritable(self.out_dir, [f"cannot create the lock {self.path} ({err.strerror})"]) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._read_holder(fd)
                os.close(fd)
                pid, _, host = holder.partition(" ")
                who = f"pid {pid} on {host}" if pid else "a process that is just starting"
                raise ValueError(f"--out_dir {self.out_dir} is in use by another run ({who}; lock {self.path}): "
                                 f"wait for it to end, or choose another --out_dir") from None
            # A holder releasing unlinks the file: if that happened between our open and flock, the
            # lock we hold is on a file nobody else will see. Start again on the current one.
            try:
                current = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                break
            os.close(fd)
        previous = self._read_holder(fd)
        if previous:
            pid, _, host = previous.partition(" ")
            print(f"note: took over the lock {self.path} left by pid {pid} on {host}, which no longer holds it",
                  file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # unlink before unlocking: see the inode check in acquire
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


class RunFolder:
    """--out_dir for one run of train.py, held from `take` to the end of the `with` block. `take` comes
    after the flags and the data are checked (bad input writes nothing): it locks the folder
    (FolderLock) and runs prepare_out_dir's checks, on rank 0 only (`master`; the other ranks of a
    torchrun job share rank 0's folder)."""

    def __init__(self, cfg):
        self.cfg, self.lock = cfg, FolderLock(cfg.out_dir)

    def __enter__(self) -> RunFolder:
        return self

    def take(self, stages: list[str], expected: GPTConfig | None = None, master: bool = True, world: int = 1) -> None:
        if master:
            self.lock.acquire()
            prepare_out_dir(self.cfg, stages, expected, world)  # a refusal releases the lock as the block ends

    def __exit__(self, *exc) -> None:
        self.lock.release()


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2 checkpoints

def load_gpt2(init_from: str, enc, block_size: int, dropout: float) -> GPT:
    """GPT-2 for --init_from gpt2:DIR: its shape from the checkpoint (--n_layer, --n_head and --n_embd
    do not apply), the position table cropped to --block_size, the tokenizer GPT-2's own."""
    if enc.name != "gpt2":
        raise ValueError(f"--init_from {init_from} needs --encoding gpt2 (GPT-2's own tokenizer), "
                         f"got --encoding {enc.name}")
    model = gpt2_from_hf(init_from[len(PRETRAINED):], block_size=block_size, dropout=dropout)
    if model.config.vocab_size != enc.n_vocab:
        raise ValueError(f"--init_from {init_from}: a vocabulary of {model.config.vocab_size} tokens, but the "
                         f"gpt2 encoding has {enc.n_vocab}")
    return model


def gpt2_from_hf(path: str, block_size: int | None = None, dropout: float = 0.0) -> GPT:
    """GPT-2 from a local Hugging Face checkpoint folder, in float32 on the CPU.

    Reads `model.safetensors` (when the optional `safetensors` package imports) or
    `pytorch_model.bin` (torch.load with weights_only=True), any of the four GPT-2 sizes: the
    shape comes from the tensors (layers from the h.N blocks, width and vocabulary from wte,
    positions from wpe) and n_head from config.json, or GPT-2's own table when it is absent.
    `block_size` crops the position table (it cannot exceed the checkpoint's). Hugging Face's
    `transformers` is not needed.
    """
    tensors, source = _read_hf_tensors(path)
    config = _gpt2_config(tensors, path, source, dropout)
    if block_size is not None:
        if block_size > config.block_size:
            raise ValueError(f"--block_size {block_size} exceeds the {config.block_size} positions of {source}")
        config.block_size = block_size
    state = _gpt2_state_dict(tensors, config, source)
    with torch.device("meta"):  # no random initialisation: every tensor comes from the checkpoint
        model = GPT(config)
    _check_names_and_shapes(state, model, source)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign replaced both; tie them again
    return model


_GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # n_embd -> n_head of GPT-2 small, medium, large, xl
# Hugging Face stores these as Conv1D, whose weight is (in, out): the transpose of nn.Linear's.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _read_hf_tensors(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's tensors, keys without the optional "transformer." prefix, and the file read."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"gpt2:{path}: no such directory")
    st_file, bin_file = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    try:
        from safetensors.torch import load_file
    except ImportError:
        load_file = None
    if os.path.isfile(st_file) and load_file is not None:
        source, read = st_file, load_file
    elif os.path.isfile(bin_file):  # weights_only: never unpickle code
        source, read = bin_file, lambda f: torch.load(f, map_location="cpu", weights_only=True)
    elif os.path.isfile(st_file):
        raise FileNotFoundError(f"{st_file}: reading it needs the safetensors package (pip install safetensors), "
                                f"or put a pytorch_model.bin beside it")
    else:
        raise FileNotFoundError(f"gpt2:{path}: holds neither model.safetensors nor pytorch_model.bin "
                                f"(sharded checkpoints are not supported)")
    try:
        tensors = read(source)
    except Exception as err:  # truncated, foreign, or holding pickled objects other than tensors
        raise ValueError(f"{source}: cannot be read as a checkpoint of tensors ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no details'})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{source}: not a state dict of tensors")
    return {k.removeprefix("transformer."): t for k, t in tensors.items()}, source


def _gpt2_config(tensors: dict[str, torch.Tensor], path: str, source: str, dropout: float) -> GPTConfig:
    for name in ("wte.weight", "wpe.weight"):
        if name not in tensors:
            raise ValueError(f"{source}: no tensor {name}; is it a GPT-2 checkpoint?")
    vocab, n_embd = tensors["wte.weight"].shape
    n_layer = len({k.split(".")[1] for k in tensors if k.startswith("h.")})
    hf = {}
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            hf = json.load(f)
    # Variants whose arithmetic differs from GPT-2's would load without error and compute
    # something else: refuse them by name.
    unsupported = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
                   "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,)}
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"{config_file}: {key}={hf[key]!r} is not supported (GPT-2 has {allowed[0]!r})")
    n_head = hf.get("n_head", _GPT2_HEADS.get(n_embd))
    if n_head is None:
        raise ValueError(f"gpt2:{path}: n_head is not in the tensors' shapes and there is no config.json giving it "
                         f"(width {n_embd} is none of GPT-2's sizes {sorted(_GPT2_HEADS)})")
    if n_embd % n_head:
        raise ValueError(f"gpt2:{path}: width {n_embd} is not a multiple of n_head {n_head}")
    return GPTConfig(vocab_size=vocab, block_size=tensors["wpe.weight"].shape[0], n_layer=n_layer,
                     n_head=n_head, n_embd=n_embd, dropout=dropout)


def _gpt2_state_dict(tensors: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """Hugging Face's names and layouts turned into this model's state dict (float32)."""
    state = {}
    for key, tensor in tensors.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        if key == "lm_head.weight":  # GPT-2 ties it to wte; a different tensor is another model
            if not torch.equal(tensor, tensors["wte.weight"]):
                raise ValueError(f"{source}: lm_head.weight differs from wte.weight; only tied GPT-2 is supported")
            continue
        tensor = tensor.float()
        state["transformer." + key] = tensor.t().contiguous() if key.endswith(_CONV1D) else tensor.contiguous()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:config.block_size].clone()
    return state


def _check_names_and_shapes(state: dict[str, torch.Tensor], model: GPT, source: str) -> None:
    """A clear error for a missing, unexpected or misshapen tensor (load_state_dict's is a wall of text)."""
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(k.removeprefix("transformer.") for k in expected.keys() - state.keys())
    unexpected = sorted(k.removeprefix("transformer.") for k in state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source}: not GPT-2's tensors: missing {missing[:5] or 'none'}, "
                         f"unexpected {unexpected[:5] or 'none'}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise ValueError(f"{source}: {key.removeprefix('transformer.')} has shape {tuple(state[key].shape)}, "
                             f"expected {tuple(shape)} (after transposing Conv1D weights)")
