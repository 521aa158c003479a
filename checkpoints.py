"""Files: what a run reads, what it writes, and the one folder it owns. Nothing here is SFTKey.

Three rules carry it; each makes a whole class of mistakes impossible rather than checking for them:
- *Every input is read once.* `read_inputs` reads --data, --eval_data, a .tiktoken --encoding and
  the --init_from checkpoint into memory (regular files only, data.read_input) and hashes those
  bytes; everything is parsed from them, and every checkpoint records the hashes and the
  --init_from origin. A file edited after the start reaches neither the run nor its resumption.
- *We own only what we name.* Every path written or deleted is `owned_path(out_dir, names...)`:
  names built from flags, each matching one pattern, no symlink under out_dir followed. A run
  plans its files first; `RunFolder` refuses a folder holding files outside the plan, and
  --overwrite deletes exactly the planned files found.
- *Whole or not at all.* `atomic_write`: a unique temporary, fsync'ed, renamed, folders fsync'ed.
Also: `StageCheckpoint`, the training loop's one hook (resume, periodic writes, stop signals, every
rank's RNG state), and GPT-2's weights from a Hugging Face folder.
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
from dataclasses import dataclass
from typing import BinaryIO, Callable

import torch

try:
    import fcntl
except ImportError:  # Windows: FolderLock says it cannot lock
    fcntl = None

import data as D
import runtime
from model import GPT, GPTConfig
from runtime import PRETRAINED, Dist, Interrupted, StopSignal

CKPT_NAME, RESULTS_NAME, LOCK_NAME, TMP_SUFFIX = "ckpt.pt", "results.json", ".sftkey.lock", ".tmp"
# The files that make a folder a run's (train.py's and experiment.py's): found at the top, or ckpt.pt
# one or two folders down. A folder holding any of them outside the plan belongs to another run.
RUN_FILES = (RESULTS_NAME, "results.md", "loss_log.jsonl", "val_loss.png", "accuracy.png")
NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*")  # what we name: no separator, never "." or ".."


# ---------------------------------------------------------------------------------------------
# Writing whole or not at all, only where we name

class WriteError(OSError):
    """A file could not be written (disk full, I/O error); the previous file, if any, is intact."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" in front
        return str(self.strerror)


def owned_path(out_dir: str, *names: str) -> str:
    """out_dir/NAME/...: refused unless each NAME matches NAME (a checkpoint's stage name can never
    climb out with "../") and nothing below out_dir on the way is a symbolic link."""
    path = out_dir
    for name in names:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a name this project writes under --out_dir (letters, digits, "
                             f"and _ . + - only, not starting with '.')")
        path = os.path.join(path, name)
        if os.path.islink(path):
            raise ValueError(f"{path} is a symbolic link: a run never writes, reads or deletes through one")
    return path


def _fsync_folder(folder: str) -> None:
    """Make the entries of `folder` (a rename, a new subfolder) durable (POSIX)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_folders(folder: str) -> None:
    """os.makedirs, then each new folder's parent fsync'ed: a power loss cannot lose the folder later
    files are renamed into."""
    new = []
    while folder and not os.path.isdir(folder):
        new.append(folder)
        folder = os.path.dirname(folder)
    if new:
        os.makedirs(new[0])
    for made in reversed(new):
        _fsync_folder(os.path.dirname(made) or ".")


class _Recording(io.RawIOBase):
    """Remembers the first OSError of a write: torch.save reports a failed write only as "unexpected
    pos", and the cause (ENOSPC, EIO) is what the user needs."""

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


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` whole or not at all, durably: `write(f)` fills a temporary made by mkstemp in the
    same folder (O_EXCL: never a planted name or link), fsync'ed, renamed over `path`, the folder
    fsync'ed. On failure the temporary is removed and the error is a WriteError naming the file."""
    folder, tmp, recording = os.path.dirname(path) or ".", None, None
    try:
        make_folders(folder)
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
        cause = (recording and recording.error) or err
        full = getattr(cause, "errno", None) in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        with contextlib.suppress(OSError, AttributeError):  # torch's own error ("unexpected pos") says less
            stat = os.statvfs(folder)
            full = full or stat.f_bavail * stat.f_frsize < 1 << 20
        before = "the previous file there is intact" if os.path.exists(path) else "nothing was written there"
        detail = str(cause).splitlines()[0] if str(cause) else "no details"
        raise WriteError(getattr(cause, "errno", None) or errno.EIO,
                         f"could not write {path}: {'the disk is full' if full else 'the write failed'} "
                         f"({type(cause).__name__}: {detail}); {before}, and the partial temporary file was "
                         f"removed") from None
    finally:
        if tmp is not None:  # failed or interrupted (KeyboardInterrupt too) before the rename
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


# ---------------------------------------------------------------------------------------------
# Reading every input once

@dataclass
class Inputs:
    """A run's input files, each read once: their bytes (by field name), the sha256 of those bytes (by
    flag), and the --init_from checkpoint parsed from its bytes, with the stage it ended and its
    position in the data stream (steps read), so a stage run from it is named by its history and
    reads on where it stopped."""
    raw: dict[str, bytes]
    sha256: dict[str, str]
    init: dict | None = None
    origin: tuple[str, int] = ("", 0)


def read_inputs(cfg) -> Inputs:
    tiktoken_file = cfg.encoding.endswith(".tiktoken") or os.path.sep in cfg.encoding
    files = {"data": cfg.data, "eval_data": cfg.eval_data, "encoding": cfg.encoding if tiktoken_file else "",
             "init_from": "" if cfg.init_from.startswith(PRETRAINED) else cfg.init_from}
    raw = {name: D.read_input(path, f"--{name}") for name, path in files.items() if path}
    inputs = Inputs(raw, {f"--{name}": hashlib.sha256(data).hexdigest() for name, data in raw.items()})
    if "init_from" in raw:
        inputs.init = read_checkpoint(cfg.init_from, None, "cpu", raw=raw.pop("init_from"))
        stage, start, step = (inputs.init.get(k, d) for k, d in (("stage", ""), ("stream_start", 0), ("step", 0)))
        if not (isinstance(stage, str) and (stage == "" or NAME.fullmatch(stage))
                and type(start) is int and type(step) is int and start >= 0 and step >= 0):
            raise ValueError(f"--init_from {cfg.init_from}: its stage name {stage!r} or stream position is not "
                             f"one this project writes")
        inputs.origin = (stage, start + step)
    return inputs


# ---------------------------------------------------------------------------------------------
# Checkpoints

# The flag that sets each model-config field, to name it when a checkpoint does not match.
_CONFIG_FLAGS = {"vocab_size": "--encoding", "block_size": "--block_size", "n_layer": "--n_layer",
                 "n_head": "--n_head", "n_embd": "--n_embd", "dropout": "--dropout"}


def rng_state() -> dict:
    """This process's CPU and CUDA RNG states (CUDA's once in use: asking earlier would start a context)."""
    return {"rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def restore_rng(ckpt: dict, rank: int = 0) -> None:
    """The RNG states rank `rank` had when `ckpt` was written (read with map_location they may sit on
    a GPU: the setters want CPU tensors); states of GPUs this machine lacks are left out."""
    state = ckpt["rng_ranks"][rank] if "rng_ranks" in ckpt else ckpt
    torch.set_rng_state(state["rng"].cpu())
    if state.get("cuda_rng") and torch.cuda.is_available():
        for index, cuda in enumerate(state["cuda_rng"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda.cpu(), index)


def save_checkpoint(path: str, model: GPT, optimizer, cfg, step: int, extra: dict | None = None) -> None:
    """Tensors and plain values only (loadable with weights_only=True), written atomically. `extra` adds
    entries (the stage, its log, every rank's RNG state as `rng_ranks`, the inputs' hashes)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
             "model_config": dataclasses.asdict(model.config), "train_config": dataclasses.asdict(cfg),
             "step": step, "rng_ranks": [rng_state()], **(extra or {})}
    atomic_write(path, lambda f: torch.save(state, f))


def read_checkpoint(path: str, expected: GPTConfig | None, device: str, encoding: str | None = None,
                    exact_vocab: int | None = None, mmap: bool = False, raw: bytes | None = None) -> dict:
    """A checkpoint (from `raw`, its bytes, when given), refused with one ValueError naming the file
    unless it holds exactly this model's weights in float32 and its shape matches `expected` (and
    `encoding`). A vocabulary of `exact_vocab` (a tokenizer's own size, GPT-2's) passes as well as the
    rounded one. torch.load with weights_only=True: loading never runs code."""
    if raw is None and not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol draws a warning; the refusal says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path if raw is None else io.BytesIO(raw), map_location=device, weights_only=True,
                              mmap=mmap)
    except pickle.UnpicklingError as err:  # weights_only met something other than tensors and plain values
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(f"{path}: refused to load: it holds a pickled Python object{what} that is not a tensor or "
                         f"a plain value, and unpickling it could run code") from None
    except Exception as err:  # a truncated or foreign file: the loader's own errors say little
        detail = str(err).splitlines()[0] if str(err) else "no details"
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {detail})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_config"), dict) or not isinstance(
            ckpt.get("model"), dict):
        raise ValueError(f"{path}: not an sftkey checkpoint (no 'model' and 'model_config' entries)")
    try:
        saved = GPTConfig(**ckpt["model_config"])
        with torch.device("meta"):  # shapes only, no memory
            reference = GPT(saved).state_dict()
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise ValueError(f"{path}: its model_config does not describe this project's GPT ({err})") from None
    weights = ckpt["model"]
    wrong = [k for k in reference if not isinstance(weights.get(k), torch.Tensor) or weights[k].shape != reference[k].shape
             or weights[k].dtype != torch.float32] + [k for k in weights if k not in reference]
    if wrong:  # another dtype would be cast silently by load_state_dict and trained on
        k = wrong[0]
        what = (f"{type(weights[k]).__name__} {tuple(getattr(weights[k], 'shape', ()))} "
                f"{getattr(weights[k], 'dtype', '')}" if k in weights else "missing")
        raise ValueError(f"{path}: {len(wrong)} weight tensor(s) are not this model's float32 tensors "
                         f"(the first: {k}, {what}; expected {tuple(reference[k].shape) if k in reference else 'none'})")
    if expected is not None:
        check_shape(ckpt, path, expected, encoding, exact_vocab)
    return ckpt


def check_shape(ckpt: dict, path: str, expected: GPTConfig, encoding: str | None = None,
                exact_vocab: int | None = None) -> None:
    """Refuse a checkpoint whose model shape (or --encoding) is not the one the flags ask for."""
    saved = GPTConfig(**ckpt["model_config"])
    if exact_vocab is not None and saved.vocab_size == exact_vocab:
        expected = dataclasses.replace(expected, vocab_size=exact_vocab)
    diffs = [f"{_CONFIG_FLAGS.get(k, k)}: {k}={getattr(saved, k)} in the checkpoint but {getattr(expected, k)} here"
             for k in vars(saved) if getattr(saved, k) != getattr(expected, k)]
    trained_with = (ckpt.get("train_config") or {}).get("encoding")
    if encoding is not None and trained_with is not None and trained_with != encoding:
        diffs.append(f"--encoding: {trained_with} in the checkpoint but {encoding} here")
    if diffs:
        raise ValueError(f"{path} does not match the flags: " + "; ".join(diffs))


def load_checkpoint(path: str, expected: GPTConfig, device: str, encoding: str | None = None,
                    exact_vocab: int | None = None) -> tuple[GPT, dict]:
    """The model a checkpoint holds, on `device`, and the checkpoint."""
    ckpt = read_checkpoint(path, expected, device, encoding, exact_vocab)
    return _model_from(ckpt, device), ckpt


def _model_from(ckpt: dict, device: str) -> GPT:
    model = GPT(GPTConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model


def model_config(cfg, enc) -> GPTConfig:
    """The shape the flags ask for, the vocabulary rounded up to a multiple of 64 (efficient matmuls)."""
    return GPTConfig(64 * math.ceil(enc.n_vocab / 64), cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                     cfg.dropout)


def build_model(cfg, enc, device: str, inputs: Inputs | None = None) -> GPT:
    """Random weights, the --init_from checkpoint's (from `inputs`, read once; else read here), or
    GPT-2's (--init_from gpt2:DIR, which keeps GPT-2's shape and its 50,257-token vocabulary, as do
    checkpoints trained from it). A model too large for memory is a flag error, not a traceback."""
    try:
        if cfg.init_from.startswith(PRETRAINED):
            return load_gpt2(cfg.init_from, enc, cfg.block_size, cfg.dropout).to(device)
        if cfg.init_from:
            init = inputs.init if inputs is not None and inputs.init is not None else read_checkpoint(
                cfg.init_from, None, "cpu")
            check_shape(init, cfg.init_from, model_config(cfg, enc), cfg.encoding, enc.n_vocab)
            return _model_from(init, device)
        return GPT(model_config(cfg, enc)).to(device)
    except (MemoryError, torch.OutOfMemoryError) as err:
        raise ValueError(f"the model does not fit in memory (--n_layer {cfg.n_layer}, --n_embd {cfg.n_embd}, "
                         f"--block_size {cfg.block_size}, a vocabulary of {enc.n_vocab}): {err}") from None
    except RuntimeError as err:  # the CPU allocator's failure is a RuntimeError
        if "alloc" not in str(err):
            raise
        raise ValueError(f"the model does not fit in memory (--n_layer {cfg.n_layer}, --n_embd {cfg.n_embd}, "
                         f"--block_size {cfg.block_size}, a vocabulary of {enc.n_vocab})") from None


# ---------------------------------------------------------------------------------------------
# The training loop's hook

# --ckpt_interval 0: write a checkpoint after the first step that ends this many seconds after the
# last write. A write of the default model costs milliseconds, invisible at this rate.
AUTO_CKPT_SECONDS = 300.0


class StageCheckpoint:
    """One stage's checkpoint as the training loop sees it: what to resume from, when to write.

    `saved` is this stage's checkpoint when resuming; `extra` goes into every write (what run() needs
    to resume the stages around this one). With no `path` nothing is written (experiment.py's arms).
    Every write holds every rank's RNG state, so dropout resumes exactly on each rank.
    """

    def __init__(self, path: str | None, cfg, stage: str, log: list[dict], saved: dict | None = None,
                 extra: dict | None = None, stop: StopSignal | None = None, dist: Dist | None = None):
        self.path, self.cfg, self.stage, self.log, self.saved = path, cfg, stage, log, saved
        self.extra, self.stop, self.dist = extra or {}, stop, dist or Dist()
        self.start = time.time() - (saved.get("elapsed", 0.0) if saved else 0.0)
        self.last_write, self.rng_ranks = time.time(), (None, None)  # (step, the ranks' states at it)

    def restore(self, optimizer: torch.optim.Optimizer) -> int:
        """The step to start from: 0, or the saved one with the optimizer and this rank's RNG as they were."""
        if self.saved is None:
            return 0
        optimizer.load_state_dict(self.saved["optimizer"])
        restore_rng(self.saved, self.dist.rank)
        return self.saved["step"]

    def elapsed(self) -> float:
        """Seconds of training in this stage, interrupted runs included."""
        return time.time() - self.start

    def save(self, step: int, model: GPT, optimizer) -> None:
        """Write the checkpoint of `step`. Every rank calls it at the same steps (the RNG states are
        gathered), except a second write of the same step, which reuses them (rank 0 only, after evaluating)."""
        if self.rng_ranks[0] != step:
            self.rng_ranks = (step, self.dist.gather(rng_state()))
        if self.path and self.dist.master:
            save_checkpoint(self.path, model, optimizer, self.cfg, step, {
                "stage": self.stage, "log": self.log, "world": self.dist.world, **self.extra,
                "elapsed": self.elapsed(), "rng_ranks": self.rng_ranks[1]})
        self.last_write = time.time()

    def due(self, done: int, iters: int) -> bool:
        """Every --ckpt_interval steps, or (0, the default) once AUTO_CKPT_SECONDS have passed since the last
        write, so a kill -9 loses minutes, not a stage; never after the last step (the stage's end writes)."""
        interval = self.cfg.ckpt_interval
        return done < iters and (done % interval == 0 if interval else time.time() - self.last_write >= AUTO_CKPT_SECONDS)

    def after_step(self, done: int, iters: int, model: GPT, optimizer) -> None:
        """Write when `due`; on a stop signal write, then raise Interrupted. All ranks decide together."""
        stopping, due = self.dist.any(self.stop is not None and self.stop.received, self.due(done, iters))
        if stopping or due:
            self.save(done, model, optimizer)
        if stopping:
            raise Interrupted(f"{self.stage} stopped by signal after step {done} of {iters}; checkpoint written "
                              f"to {self.path}. Resume with the same command and --resume.")


# ---------------------------------------------------------------------------------------------
# Resuming: the same flags, the same input bytes, a complete checkpoint

def resume_mismatches(ckpt: dict, cfg, hashes: dict[str, str] | None = None) -> list[str]:
    """What differs between the run that wrote `ckpt` and the flags `cfg`, one entry per flag with both
    values: every field runtime.FLAGS marks "same" on resume, then (given `hashes`, the sha256 of
    this run's inputs) the input files' contents."""
    saved, here = ckpt.get("train_config"), dataclasses.asdict(cfg)
    if not isinstance(saved, dict):
        return ["the checkpoint records no flags (train_config)"]
    absent, diffs = object(), []
    show = lambda value, missing: missing if value is absent else "(empty)" if value == "" else str(value)  # noqa: E731
    for name in dict.fromkeys([*here, *saved]):  # a flag unknown here (from a later version) is compared too
        before, now = saved.get(name, absent), here.get(name, absent)
        if runtime.FLAGS.get(name, ("", "same"))[1] == "same" and before != now:
            diffs.append(f"--{name}: {show(before, 'not recorded')} in the checkpoint, {show(now, 'no such flag')} here")
    recorded = ckpt.get("file_hashes") if isinstance(ckpt.get("file_hashes"), dict) else {}
    for flag, digest in (hashes or {}).items():
        if saved.get(flag[2:]) == here[flag[2:]] and recorded.get(flag) != digest:  # another path: named above
            was = f"sha256 {recorded[flag][:12]}…" if flag in recorded else "not recorded"
            diffs.append(f"{flag} {here[flag[2:]]}: other contents ({was} in the checkpoint, sha256 {digest[:12]}… here)")
    return diffs


_RESUME_ENTRIES = {"step": int, "log": list, "results": dict, "seconds": dict, "stage": str, "rng_ranks": list,
                   "optimizer": dict}


def check_resume(path: str, cfg, expected: GPTConfig, world: int, hashes: dict[str, str]) -> None:
    """Refuse, in one ValueError naming the file and every problem, a checkpoint --resume cannot
    continue: another run's (flags, input bytes, ranks), or one lacking what resuming needs."""
    ckpt = read_checkpoint(path, expected, "cpu", cfg.encoding, mmap=True)
    problems = [f"no '{key}' entry" if key not in ckpt else f"'{key}' is a {type(ckpt[key]).__name__}, not "
                f"{'an' if kind.__name__[0] in 'aeiou' else 'a'} {kind.__name__}"
                for key, kind in _RESUME_ENTRIES.items() if type(ckpt.get(key)) is not kind]
    if not problems and (ckpt["step"] < 0 or len(ckpt["rng_ranks"]) != ckpt.get("world", 1)
                         or ckpt["stage"] != os.path.basename(os.path.dirname(path))):
        problems.append(f"step {ckpt['step']}, {len(ckpt['rng_ranks'])} RNG states for {ckpt.get('world', 1)} "
                        f"rank(s), stage {ckpt['stage']} in the folder {os.path.basename(os.path.dirname(path))}")
    if problems:
        raise ValueError(f"{path}: not a checkpoint --resume can continue from: {'; '.join(problems)}")
    diffs = resume_mismatches(ckpt, cfg, hashes)
    if ckpt.get("world", 1) != world:
        diffs.append(f"ranks: {ckpt.get('world', 1)} in the checkpoint, {world} here (they set the batch, "
                     f"--batch_size x --grad_accum x ranks)")
    if diffs:
        raise ValueError(f"{path} was written by another run: {'; '.join(diffs)}. Resume with the flags and files "
                         f"it was written with, start afresh with --overwrite (deletes that run's files), or choose "
                         f"another --out_dir")


# ---------------------------------------------------------------------------------------------
# One run per folder

def found_files(out_dir: str) -> list[str]:
    """The run files in out_dir (RUN_FILES at the top, ckpt.pt one or two folders down), not following links."""
    found = []
    for folder, subfolders, files in os.walk(out_dir):
        depth = os.path.relpath(folder, out_dir).count(os.sep) + (folder != out_dir)
        found += [os.path.join(folder, f) for f in files if f in (RUN_FILES if depth == 0 else (CKPT_NAME,))]
        if depth >= 2:
            subfolders.clear()
    return sorted(found)


class RunFolder:
    """--out_dir, held by one run from `take` to the end of the `with` block.

    `take(plan)` (after the flags and the data are checked, so bad input writes nothing) locks the
    folder (FolderLock), then checks it against the plan, the files this run writes (tuples of
    names under out_dir): each is an owned_path; any run file found outside the plan refuses the
    folder, --overwrite or not (it is another run's, or an interrupted one's); run files of the plan
    refuse a fresh run unless --overwrite, which deletes exactly them; --resume keeps them, each
    checkpoint found first handed to `check`. Temporaries of writes killed mid-way are removed."""

    def __init__(self, out_dir: str, overwrite: bool = False, resume: bool = False, resumable: bool = True):
        self.out_dir, self.overwrite, self.resume, self.resumable = out_dir, overwrite, resume, resumable
        self.lock = FolderLock(out_dir)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def take(self, plan: list[tuple[str, ...]], check: Callable[[str], None] | None = None,
             master: bool = True) -> None:
        if not master:  # the other ranks of a torchrun job share rank 0's folder
            return
        self.lock.acquire()
        out, planned = self.out_dir, [owned_path(self.out_dir, *names) for names in plan]
        found = found_files(out)
        for path in (p for p in found if self.resume and check is not None and p.endswith(CKPT_NAME)):
            check(path)  # first: "written by another run" names the flag or file that differs
        strangers = [p for p in found if p not in planned]
        if strangers:
            raise ValueError(f"--out_dir {out} holds files this run does not write ({', '.join(strangers[:3])}"
                             f"{', …' * (len(strangers) > 3)}): another run's. This run writes only "
                             f"{', '.join(os.path.relpath(p, out) for p in planned)}; choose another --out_dir, "
                             f"or move those files away")
        problems = [f"{p} is a folder, not a file" for p in planned if os.path.isdir(p)]
        problems += [f"{os.path.dirname(p)} is a file, not a folder" for p in planned
                     if os.path.lexists(os.path.dirname(p)) and not os.path.isdir(os.path.dirname(p))]
        problems += [why for why in {_probe(os.path.dirname(p)) for p in planned if os.path.isdir(os.path.dirname(p))} if why]
        if problems:
            raise ValueError(f"--out_dir {out}: the run could not write its files there: {'; '.join(problems)}. "
                             f"Nothing was trained; fix this or choose another --out_dir")
        for folder in {os.path.dirname(p) for p in planned if os.path.isdir(os.path.dirname(p))}:
            for entry in os.listdir(folder):  # the folder is locked: no other writer owns these
                if entry.startswith(".") and entry.endswith(TMP_SUFFIX) and entry != LOCK_NAME:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(folder, entry))
        if self.resume:
            if not any(p.endswith(CKPT_NAME) for p in found):
                print(f"--resume: no checkpoint in {out}: starting from step 0", file=sys.stderr, flush=True)
        elif found and not self.overwrite:
            raise ValueError(f"--out_dir {out} holds the files of an earlier run ({', '.join(found)}): "
                             + ("continue it with --resume (and the same flags), " if self.resumable else "")
                             + "delete them with --overwrite, or choose another --out_dir")
        elif found:
            for path in found:
                os.unlink(path)
            print(f"--overwrite: deleted {', '.join(found)}", file=sys.stderr, flush=True)


def _probe(folder: str) -> str | None:
    """Why a file cannot be created in `folder` (None: it can), found by creating one."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".sftkey-probe.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        return f"cannot create files in {folder} ({err.strerror or err})"
    return None


class FolderLock:
    """An exclusive lock on a run folder for the run's life: fcntl.flock on out_dir/.sftkey.lock,
    released by the kernel when the holder's process ends however it ends (kill -9 too), so a dead run
    never blocks the folder. The file names the holder ("pid host"); a second run is refused at once
    naming it. Where fcntl is missing (Windows) there is no lock, and a note says so."""

    def __init__(self, out_dir: str):
        self.out_dir, self.path, self.fd = out_dir, os.path.join(out_dir, LOCK_NAME), None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _holder(self, fd: int) -> str:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode("utf-8", "replace").strip()

    def acquire(self) -> None:
        if fcntl is None:
            print(f"note: no file locking on this system: nothing stops a second run in {self.out_dir}",
                  file=sys.stderr, flush=True)
            return
        try:
            make_folders(self.out_dir)
        except OSError as err:  # a read-only file system, a path under a file, no permission
            raise ValueError(f"--out_dir {self.out_dir}: the run could not write its files there: cannot create "
                             f"{self.out_dir} ({err.strerror or err}). Nothing was trained") from None
        while True:
            try:  # O_NOFOLLOW: a symlink planted at the lock's name is refused, never followed
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as err:
                raise ValueError(f"--out_dir {self.out_dir}: cannot create the lock {self.path} ({err.strerror}); "
                                 f"nothing was trained") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid, _, host = self._holder(fd).partition(" ")
                os.close(fd)
                who = f"pid {pid} on {host}" if pid else "a process that is just starting"
                raise ValueError(f"--out_dir {self.out_dir} is in use by another run ({who}; lock {self.path}): "
                                 f"wait for it to end, or choose another --out_dir") from None
            # A holder releasing unlinks the file: if that happened between our open and flock, the lock
            # we hold is on a file nobody else sees. Start again on the current one.
            with contextlib.suppress(FileNotFoundError):
                current, mine = os.stat(self.path, follow_symlinks=False), os.fstat(fd)
                if (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                    break
            os.close(fd)
        if previous := self._holder(fd):
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
