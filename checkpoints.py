"""Files: what a run reads, what it writes, and the one folder it owns. Nothing here is SFTKey. Three rules
(docs/failure_modes.md): *every input is read once* (`read_inputs`) and hashed from those bytes; *we own only what
we name*: every path written or deleted is `owned_path(out_dir, names...)`, no symlink followed, and `RunFolder`
refuses run files outside the run's plan; *whole or not at all*: `atomic_write` (a temporary, fsync'ed, renamed).
Also `StageCheckpoint`, the loop's one hook (resume, periodic writes, signals, every rank's RNG state)."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import hashlib
import io
import json
import math
import os
import pickle
import re
import stat
import sys
import tempfile
import time
import warnings
from typing import BinaryIO, Callable

import torch

import data as D
from model import GPT, GPTConfig
from runtime import FLAGS, SYNTHETIC, Dist, Interrupted, StopSignal, resolve_device

CKPT_NAME, RESULTS_NAME, LOCK_NAME, TMP_SUFFIX = "ckpt.pt", "results.json", ".sftkey.lock", ".tmp"
LOG_NAME, PLOT_NAME = "log.jsonl", "loss.png"  # PLOT_NAME: plots.py draws it, --overwrite deletes it
TRAIN_FILES = (RESULTS_NAME, LOG_NAME, PLOT_NAME)  # what each command plans: --overwrite deletes these only
EXPERIMENT_FILES = (RESULTS_NAME, "results.md", "loss_log.jsonl", "val_loss.png", "accuracy.png")
RUN_FILES = tuple(dict.fromkeys(TRAIN_FILES + EXPERIMENT_FILES))  # a run's files, this command's or another's
NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,99}")  # what we name: no separator, no "." or "..", short


# Writing whole or not at all, only where we name
class WriteError(OSError):
    """A file could not be written (disk full, I/O error); the previous file, if any, is intact."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" in front
        return str(self.strerror)


def owned_path(out_dir: str, *names: str) -> str:
    """out_dir/NAME/..., refused unless each NAME matches NAME (no climbing out with "..") and no link is on the way."""
    path = out_dir
    for name in names:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a name this project writes under --out_dir (letters, digits, "
                             f"and _ . + - only, not starting with '.', at most 100 characters)")
        path = os.path.join(path, name)
        if os.path.islink(path):
            raise ValueError(f"{path} is a symbolic link: a run never writes, reads or deletes through one")
    return path


def open_owned(path: str, flags: int) -> int:
    """os.open of a file written in place (the lock, log.jsonl): a symbolic or hard link or a FIFO there is refused."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)  # a FIFO would wait for a reader
    if not stat.S_ISREG((found := os.fstat(fd)).st_mode) or found.st_nlink > 1:
        os.close(fd)
        raise ValueError(f"{path}: a hard link, or not a regular file: a run writes in place only its own files")
    return fd


def _fsync_folder(folder: str) -> None:
    """Make the entries of `folder` (a rename, a new subfolder) durable (POSIX)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_folders(folder: str) -> None:
    """os.makedirs, each new folder's parent fsync'ed: a power loss cannot lose a folder files go into."""
    if folder and not os.path.isdir(folder):
        make_folders(os.path.dirname(folder))
        os.makedirs(folder, exist_ok=True)  # not mkdir: "a/b/" after "a/b", or a run beside this one was first
        _fsync_folder(os.path.dirname(folder) or ".")


class _Recording(io.RawIOBase):
    """Remembers the first OSError of a write: torch.save says only "unexpected pos", not ENOSPC or EIO."""

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


os.umask(_UMASK := os.umask(0o022))  # the only way to read the umask is to set it: put it straight back


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` whole or not at all, durably: `write(f)` fills a mkstemp temporary beside it (O_EXCL: never a
    planted name or link), fsync'ed, renamed, the folder fsync'ed. A failure is a WriteError naming the file."""
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
        before = "the previous file there is intact" if os.path.exists(path) else "nothing was written there"
        raise WriteError(getattr(cause, "errno", None) or errno.EIO, f"could not write {path}: "
                         f"{'the disk is full' if full else 'the write failed'} ({type(cause).__name__}: "
                         f"{str(cause).splitlines()[0] if str(cause) else 'no details'}); {before}, and the partial "
                         f"temporary file was removed") from None
    finally:
        if tmp is not None:  # failed or interrupted (KeyboardInterrupt too) before the rename
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


# Reading every input once
@dataclasses.dataclass
class Inputs:
    """A run's input files, read once: bytes, sha256 by flag, the --init_from checkpoint, its origin (stage, step)."""
    raw: dict[str, bytes]
    sha256: dict[str, str]
    init: dict | None = None
    origin: tuple[str, int] = ("", 0)


def read_inputs(cfg) -> Inputs:
    """Every input file the flags name, read (regular files only) and hashed; --init_from parsed once, and checked."""
    files = {"data": cfg.data, "eval_data": cfg.eval_data,
             "encoding": cfg.encoding if D.is_tokenizer_file(cfg.encoding) else "", "init_from": cfg.init_from}
    raw = {name: D.read_input(path, f"--{name}") for name, path in files.items() if path}
    inputs = Inputs(raw, {f"--{name}": hashlib.sha256(data).hexdigest() for name, data in raw.items()})
    if "init_from" in raw:
        inputs.init = init = read_checkpoint(cfg.init_from, None, "cpu", raw=raw.pop("init_from"))
        stage, start, step = (init.get(k, d) for k, d in (("stage", ""), ("stream_start", 0), ("step", 0)))
        trained, sha = (init[k] if isinstance(init.get(k), dict) else {} for k in ("train_config", "file_hashes"))
        learnt, here = ("--data" if c.get("data") else f"--task {c.get('task')}" for c in (trained, vars(cfg)))
        digest = inputs.sha256.get("--encoding")  # a .tiktoken file's: the ids it learnt must mean the same bytes
        for refused, why in (
                (not (isinstance(stage, str) and (stage == "" or NAME.fullmatch(stage)) and type(start) is int
                      and type(step) is int and 0 <= start + step < 2 ** 63 and step >= 0),
                 f"its stage name {stage!r} or stream position is not one this project writes"),
                (init.get("finished") is False, f"stage {stage} stopped at step {step}: finish it with --resume first"),
                (digest and sha.get("--encoding", digest) != digest,
                 f"--encoding {cfg.encoding}: not the tokenizer file it was trained with (another sha256)"),
                (cfg.eval_only and trained.get("untagged", cfg.untagged) != cfg.untagged,
                 f"trained {'with' if trained.get('untagged') else 'without'} --untagged: score it so, in its layout"),
                (cfg.eval_only and "task" in trained and learnt != here,  # a train.py checkpoint: not GPT-2's
                 f"trained on {learnt}, not {here}: evaluate it on {learnt}")):
            if refused:
                raise ValueError(f"--init_from {cfg.init_from}: {why}")
        inputs.origin = (stage, start + step)
    return inputs


# Checkpoints
def rng_state() -> dict:
    """This process's CPU and CUDA RNG states (CUDA's once in use: asking earlier would start a context)."""
    return {"rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def restore_rng(ckpt: dict, rank: int = 0) -> None:
    """The RNG states rank `rank` had when `ckpt` was written (as CPU tensors; GPUs this machine lacks left out)."""
    state = ckpt["rng_ranks"][rank] if "rng_ranks" in ckpt else ckpt
    torch.set_rng_state(state["rng"].cpu())
    for index, cuda in enumerate(state.get("cuda_rng", [])[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(cuda.cpu(), index)


def save_checkpoint(path: str, model: GPT, optimizer, cfg, step: int, extra: dict | None = None,
                    stop: StopSignal | None = None) -> None:
    """Tensors and plain values (weights_only=True loads them) and `extra`, written whole; a `stop` signal waits."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
             "model_config": dataclasses.asdict(model.config), "train_config": dataclasses.asdict(cfg),
             "step": step, "rng_ranks": [rng_state()], **(extra or {})}
    with stop.deferred() if stop else contextlib.nullcontext():
        atomic_write(path, lambda f: torch.save(state, f))


def read_checkpoint(path: str, expected: GPTConfig | None, device: str, encoding: str | None = None,
                    mmap: bool = False, raw: bytes | None = None) -> dict:
    """A checkpoint (from `raw`, its bytes, if given), loaded with weights_only=True (never running code), refused in
    one ValueError unless it holds exactly this model's finite float32 weights shaped as `expected` (and `encoding`)."""
    if raw is None and not os.path.isfile(path):  # a FIFO would block torch.load, /dev/zero never end
        D.read_input(path, "checkpoint")  # raises its reason: no such file, not a regular file, ...
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol draws a warning; the refusal says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path if raw is None else io.BytesIO(raw), map_location=device, weights_only=True,
                              mmap=mmap)
    except pickle.UnpicklingError as err:  # weights_only met something other than tensors and plain values
        named = re.search(r"GLOBAL (\S+)", str(err))  # a class or function that unpickling would call
        other = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))  # e.g. an opcode it does not know
        what = f"a pickled Python object ({named[1]})" if named else other[1] if other else "other data"
        raise ValueError(f"{path}: refused to load: the safe loader met {what}, not tensors and plain values; not "
                         f"a checkpoint this project writes, and unpickling it could run code") from None
    except Exception as err:  # a truncated or foreign file: the loader's own errors say little
        detail = str(err).splitlines()[0] if str(err) else "no details"
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {detail})") from None
    if not (isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), dict) for k in ("model", "model_config"))):
        raise ValueError(f"{path}: not an sftkey checkpoint (no 'model' and 'model_config' entries)")
    try:
        saved = GPTConfig(**ckpt["model_config"])
        if any(type(getattr(saved, f.name)) is not type(f.default) for f in dataclasses.fields(GPTConfig)):
            raise TypeError("a field of another type than GPTConfig's")  # True would pass as 1 layer
        if saved.n_layer > len(ckpt["model"]) or not 0 <= saved.dropout < 1:  # 2**40 blocks: hours to build
            raise ValueError(f"n_layer {saved.n_layer} for {len(ckpt['model'])} tensors, or dropout {saved.dropout}")
        with torch.device("meta"):  # shapes only, no memory
            reference = GPT(saved).state_dict()
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise ValueError(f"{path}: its model_config does not describe this project's GPT ({err})") from None
    weights = ckpt["model"]
    wrong = [k for k in reference if not isinstance(t := weights.get(k), torch.Tensor) or t.shape != reference[k].shape
             or t.dtype != torch.float32 or t.layout != torch.strided or t.is_meta]  # sparse or meta: not numbers
    wrong += [k for k in weights if k not in reference]
    if wrong:  # another dtype would be cast silently by load_state_dict and trained on
        found = weights.get(wrong[0])
        what = f"{getattr(found, 'dtype', type(found).__name__)} {tuple(getattr(found, 'shape', ()))}" \
            if wrong[0] in weights else "missing"
        raise ValueError(f"{path}: {len(wrong)} weight tensor(s) are not this model's float32 tensors (the first: "
                         f"{wrong[0]}, {what})")
    if bad := next((k for k, tensor in weights.items() if not torch.isfinite(tensor).all()), None):
        raise ValueError(f"{path}: weight tensor {bad} holds NaN or inf (train.py never saves such weights)")
    if expected is not None:
        check_shape(ckpt, path, expected, encoding)
    return ckpt


def check_shape(ckpt: dict, path: str, expected: GPTConfig, encoding: str | None = None,
                exact_vocab: int | None = None) -> None:
    """Refuse a checkpoint whose shape (or --encoding) is not the flags'; `exact_vocab` (GPT-2's own) passes too."""
    saved = GPTConfig(**ckpt["model_config"])
    if exact_vocab is not None and saved.vocab_size == exact_vocab:
        expected = dataclasses.replace(expected, vocab_size=exact_vocab)
    diffs = [f"{'--encoding' if k == 'vocab_size' else '--' + k}: {k}={getattr(saved, k)} in the checkpoint but "
             f"{getattr(expected, k)} here" for k in vars(saved) if getattr(saved, k) != getattr(expected, k)]
    trained = ckpt.get("train_config")
    trained_with = trained.get("encoding") if isinstance(trained, dict) else None
    if encoding is not None and trained_with is not None and trained_with != encoding:
        diffs.append(f"--encoding: {trained_with} in the checkpoint but {encoding} here")
    if diffs:
        raise ValueError(f"{path} does not match the flags: " + "; ".join(diffs))


def model_config(cfg, enc) -> GPTConfig:
    """The shape the flags ask for, the vocabulary rounded up to a multiple of 64 (efficient matmuls)."""
    return GPTConfig(64 * math.ceil(enc.n_vocab / 64), cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout)


def build_model(cfg, enc, device: str, inputs: Inputs | None = None) -> GPT:
    """Random weights, or the --init_from checkpoint's (from `inputs`; GPT-2's: `python gpt2.py import`, whose
    50,257-token vocabulary checkpoints trained from it keep). Too large for memory: a flag error."""
    try:
        if cfg.init_from:
            init = (inputs and inputs.init) or read_checkpoint(cfg.init_from, None, "cpu")
            check_shape(init, cfg.init_from, model_config(cfg, enc), cfg.encoding, enc.n_vocab)
            model = GPT(GPTConfig(**init["model_config"])).to(device)
            model.load_state_dict(init["model"])  # float32 and these shapes: read_checkpoint checked
            return model
        return GPT(model_config(cfg, enc)).to(device)
    except (MemoryError, RuntimeError) as err:  # CUDA's OutOfMemoryError and the CPU allocator's are RuntimeErrors
        if isinstance(err, RuntimeError) and not re.search("alloc|overflow", str(err)):
            raise
        raise ValueError(f"the model does not fit in memory (--n_layer {cfg.n_layer}, --n_embd {cfg.n_embd}, "
                         f"--block_size {cfg.block_size}, a vocabulary of {enc.n_vocab})") from None


# The training loop's hook
AUTO_CKPT_SECONDS = 300.0  # --ckpt_interval 0: a write once this long has passed (milliseconds each here)


class LiveLog(list):
    """A run's log rows, each also appended to out_dir/log.jsonl as it comes (`tail -f` follows a run, a crash loses
    no row; `python plots.py` draws it); `note` writes to the file only. Without `out_dir` (other ranks): a list."""

    def __init__(self, out_dir: str | None = None):
        super().__init__()
        self.path = owned_path(out_dir, LOG_NAME) if out_dir else None
        if self.path and os.path.lexists(self.path):  # --resume appends to it: a link or a FIFO is refused now
            os.close(open_owned(self.path, os.O_RDWR))
        self._cut = None  # where the next write first cuts the file back to (resume)

    @property
    def written(self) -> int:
        """The file's length as this run has it (a cut still to come counts as made): every checkpoint records it."""
        size = os.path.getsize(self.path) if self.path and os.path.exists(self.path) else 0
        return size if self._cut is None else min(self._cut, size)  # the user may have cut or deleted it

    def resume(self, ckpt: dict) -> None:
        """The rows of the checkpoint --resume continues from. Rows a killed run wrote after it go from the file as
        the next row comes (the last checkpoint loaded counts), so the file reads as an uninterrupted run's."""
        self[:], self._cut = ckpt["log"], cut if type(cut := ckpt.get("log_bytes")) is int and cut >= 0 else None

    def append(self, row: dict) -> None:
        super().append(row)
        self.note(row)

    def note(self, row: dict) -> None:
        if self.path:  # like every path we write, never through a link
            with open(open_owned(self.path, os.O_WRONLY | os.O_APPEND), "ab") as f:
                if self._cut is not None and os.fstat(f.fileno()).st_size > self._cut:
                    f.truncate(self._cut)
                self._cut = None
                f.write((json.dumps(row) + "\n").encode())


class StageCheckpoint:
    """One stage's checkpoint as the loop sees it: `saved` (when resuming) to start from, when to write, `extra` in
    every write (what run() needs around this stage), every rank's RNG state. With no `path` nothing is written."""

    def __init__(self, path: str | None, cfg, stage: str, log: list[dict], saved: dict | None = None,
                 extra: dict | None = None, stop: StopSignal | None = None, dist: Dist = Dist()):
        self.path, self.cfg, self.stage, self.log, self.saved = path, cfg, stage, log, saved
        self.extra, self.stop, self.dist = extra or {}, stop, dist
        self.start = time.time() - (saved.get("elapsed", 0.0) if saved else 0.0)
        self.last_write, self.rng_ranks = time.time(), (None, None)  # (step, the ranks' states at it)

    def restore(self, optimizer: torch.optim.Optimizer) -> int:
        """The step to start from: 0, or the saved one with the optimizer and this rank's RNG as they were."""
        if self.saved is None:
            return 0
        optimizer.load_state_dict(self.saved["optimizer"])
        restore_rng(self.saved, self.dist.rank)
        self.dist.print(f"{self.stage}: resumed at step {self.saved['step']} from {self.path}")
        return self.saved["step"]

    def elapsed(self) -> float:  # seconds of training in this stage, interrupted runs included
        return time.time() - self.start

    def save(self, step: int, model: GPT, optimizer, finished: bool = True) -> None:
        """Write `step`'s checkpoint (`finished`: the stage's last); all ranks call it (RNG states: once a step)."""
        if self.rng_ranks[0] != step:
            self.rng_ranks = (step, self.dist.gather(rng_state()))
        if self.path and self.dist.master:
            save_checkpoint(self.path, model, optimizer, self.cfg, step, {
                "stage": self.stage, "log": list(self.log), "log_bytes": getattr(self.log, "written", None),
                "world": self.dist.world, "finished": finished, **self.extra,
                "elapsed": self.elapsed(), "rng_ranks": self.rng_ranks[1]}, self.stop)
        self.last_write = time.time()

    def due(self, done: int, iters: int) -> bool:
        """Every --ckpt_interval steps or (0) AUTO_CKPT_SECONDS: a kill -9 loses minutes; not at the stage's end."""
        interval, waited = self.cfg.ckpt_interval, time.time() - self.last_write
        return done < iters and (done % interval == 0 if interval else waited >= AUTO_CKPT_SECONDS)

    def after_step(self, done: int, iters: int, model: GPT, optimizer) -> None:
        """Write when `due`; on a stop signal write, then raise Interrupted. All ranks decide together."""
        stopping, due = self.dist.any(self.stop is not None and self.stop.received, self.due(done, iters))
        if stopping or due:
            self.save(done, model, optimizer, done >= iters)
        if stopping:
            raise Interrupted(f"{self.stage} stopped by signal after step {done} of {iters}; checkpoint written "
                              f"to {self.path}. Resume with the same command and --resume.")


# Resuming: the same flags, the same input bytes, a complete checkpoint
def resume_mismatches(ckpt: dict, cfg, hashes: dict[str, str] | None = None) -> list[str]:
    """What differs, both values named, from the run that wrote `ckpt`: FLAGS' "same" fields, the inputs' `hashes`."""
    saved, here, defaults = ckpt.get("train_config"), dataclasses.asdict(cfg), dataclasses.asdict(type(cfg)())
    if not isinstance(saved, dict):
        return ["the checkpoint records no flags (train_config)"]
    absent, diffs = object(), []
    show = lambda value, missing: missing if value is absent else "(empty)" if value == "" else str(value)  # noqa: E731
    for name in dict.fromkeys([*here, *saved]):  # a flag unknown here (from a later version) is compared too
        was, now = saved.get(name, absent), here.get(name, absent)
        if name == "dtype" and was == "auto" != now:  # written before runs recorded what auto resolved to: as here
            was = str(resolve_device(dataclasses.replace(cfg, dtype="auto"))[1]).removeprefix("torch.")
        if now == defaults.get(name, absent) and (was is absent or (name in SYNTHETIC and saved.get("data"))):
            continue  # added since that run, at its default: as it ran; or the task's, which its --data ignored
        if FLAGS.get(name, ("", "same"))[1] == "same" and was != now:
            diffs.append(f"--{name}: {show(was, 'not recorded')} in the checkpoint, {show(now, 'no such flag')} here")
    recorded = ckpt.get("file_hashes") if isinstance(ckpt.get("file_hashes"), dict) else {}
    for flag, digest in (hashes or {}).items():
        if saved.get(flag[2:]) == here[flag[2:]] and recorded.get(flag) != digest:  # another path: named above
            was = f"sha256 {recorded[flag][:12]}…" if flag in recorded else "not recorded"
            diffs.append(f"{flag} {here[flag[2:]]}: other contents ({was} in the checkpoint, "
                         f"sha256 {digest[:12]}… here)")
    return diffs


_RESUME_ENTRIES = {"step": int, "log": list, "results": dict, "seconds": dict, "stage": str, "rng_ranks": list,
                   "optimizer": dict}


def check_resume(path: str, cfg, expected: GPTConfig, world: int, hashes: dict[str, str]) -> None:
    """Refuse in one ValueError a checkpoint --resume cannot continue: another run's, or an incomplete one."""
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
        raise ValueError(f"{path} was written by another run: {'; '.join(diffs)}. Resume with its flags and files, "
                         f"start afresh with --overwrite (deletes that run's files), or choose another --out_dir")


# One run per folder
class FolderLock(contextlib.AbstractContextManager):
    """flock on out_dir/.sftkey.lock, released however the holder ends (kill -9 too); it names the holder (pid host)."""

    def __init__(self, out_dir: str):
        self.out_dir, self.path, self.fd = out_dir, os.path.join(out_dir, LOCK_NAME), None

    def _holder(self, fd: int) -> str:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()

    def acquire(self) -> None:
        while True:
            try:  # a link or FIFO planted at the lock's name is refused, never followed
                make_folders(self.out_dir)
                fd = open_owned(self.path, os.O_RDWR)
            except OSError as err:  # a read-only file system, a path under a file, no permission
                raise ValueError(f"--out_dir {self.out_dir}: the run could not write its files there: cannot create "
                                 f"{err.filename or self.path} ({err.strerror or err}). Nothing was trained") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid, _, host = self._holder(fd).partition(" ")
                os.close(fd)
                who = f"pid {pid} on {host}" if pid else "a process that is just starting"
                raise ValueError(f"--out_dir {self.out_dir} is in use by another run ({who}; lock {self.path}): "
                                 f"wait for it to end, or choose another --out_dir") from None
            # A holder releasing unlinks the file: if it did between our open and flock, start again on the new one.
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.stat(self.path, follow_symlinks=False), os.fstat(fd)):
                    break
            os.close(fd)
        if previous := self._holder(fd):
            print(f"note: took over the lock {self.path} left by pid {previous}, which no longer holds it",
                  file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {os.uname().nodename}\n".encode(), 0)  # as socket.gethostname()
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):  # unlink before unlocking: see the inode check in acquire
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None

    def __exit__(self, *exc) -> None:
        self.release()


class RunFolder(FolderLock):
    """--out_dir, held by one run from `take(plan)` (the files it writes) to the `with` block's end. A run file outside
    the plan is refused; planned ones need --overwrite (deletes them) or --resume (each checkpoint goes to `check`)."""

    def __init__(self, out_dir: str, overwrite: bool = False, resume: bool = False, resumable: bool = True,
                 flags: dict | None = None):  # the run's flags: a file one names refuses the folder if found
        super().__init__(out_dir)
        self.overwrite, self.resume, self.resumable, self.flags = overwrite, resume, resumable, flags or {}

    def take(self, plan: list[tuple[str, ...]], check: Callable[[str], None] | None = None, dist: Dist = Dist()):
        """Rank 0 locks and checks; every rank of a torchrun job then raises rank 0's refusal, if any."""
        refusal = ""
        if dist.master:
            try:
                self._take(plan, check)
            except ValueError as err:
                refusal = str(err)
        if refusal := dist.gather(refusal)[0]:
            raise ValueError(refusal)

    def _take(self, plan: list[tuple[str, ...]], check: Callable[[str], None] | None) -> None:
        out, planned = self.out_dir, [owned_path(self.out_dir, *names) for names in plan]
        self.acquire()  # after the names are checked: acquire makes the folder, and a bad name must leave none
        # Run files (ours, or another run's): RUN_FILES and (a stage folder's) ckpt.pt at the top, ckpt.pt 1-2 down.
        top, folder = [os.path.join(out, name) for name in RUN_FILES + (CKPT_NAME,)], glob.escape(out)
        deeper = glob.glob(os.path.join(folder, "*", CKPT_NAME)) + glob.glob(os.path.join(folder, "*", "*", CKPT_NAME))
        found = sorted(path for path in top + deeper if os.path.isfile(path))
        for flag, value in ((f, v) for f, v in self.flags.items() if type(v) is str and os.path.isfile(v)):  # inputs
            if same := [p for p in found if os.path.samefile(p, value)]:  # however the path is spelled
                raise ValueError(f"--{flag} {value} is the run file {same[0]}, which the run would replace: move it")
        for path in (p for p in found if self.resume and check is not None and p.endswith(CKPT_NAME)):
            check(path)  # first: "written by another run" names the flag or file that differs
        strangers = [p for p in found if p not in planned]
        if strangers:
            raise ValueError(f"--out_dir {out} holds files this run does not write ({', '.join(strangers[:3])}"
                             f"{', …' * (len(strangers) > 3)}): another run's, or one with other flags. This run "
                             f"writes only {', '.join(os.path.relpath(p, out) for p in planned)}; choose another "
                             f"--out_dir, or move those files away")
        folders = sorted({os.path.dirname(p) for p in planned if os.path.lexists(os.path.dirname(p))})
        problems = [f"{p} is a folder, not a file" for p in planned if os.path.isdir(p)]
        for folder in folders:  # can a file be created there? make one
            try:
                tempfile.TemporaryFile(dir=folder).close()  # nameless where the system allows: none is left
            except OSError as err:
                problems.append(f"{folder} is a file, not a folder" if not os.path.isdir(folder)
                                else f"cannot create files in {folder} ({err.strerror or err})")
        if problems:
            raise ValueError(f"--out_dir {out}: the run could not write its files there: {'; '.join(problems)}. "
                             f"Nothing was trained; fix this or choose another --out_dir")
        for folder in folders:  # temporaries of our writes killed mid-way: the folder is locked, none is live
            ours = tuple(f".{name}." for up, name in map(os.path.split, planned) if up == folder)
            for entry in (e for e in os.listdir(folder) if e.startswith(ours) and e.endswith(TMP_SUFFIX)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, entry))
        if self.resume and any(p.endswith(CKPT_NAME) for p in found):
            return  # each checkpoint went to `check`; log.jsonl goes on from the last one (LiveLog.resume)
        # --resume with no checkpoint: a run killed before its first left its log (not this run's); results.json is
        # written last, so one here is a finished run's (an --eval_only one's): kept, as from a fresh run.
        killed = [p for p in found if self.resume and os.path.basename(p) in (LOG_NAME, PLOT_NAME)]
        if (finished := [p for p in found if p not in killed]) and not self.overwrite:
            raise ValueError(f"--out_dir {out} holds the files of an earlier run ({', '.join(finished)}): "
                             + "continue it with --resume (and the same flags), " * (self.resumable and not self.resume)
                             + "delete them with --overwrite, or choose another --out_dir")
        for path in found:
            os.unlink(path)
        if self.resume:
            print(f"--resume: no checkpoint in {out}: starting from step 0"
                  + (f" (deleted {', '.join(found)})" if found else ""), file=sys.stderr, flush=True)
        elif found:
            print(f"--overwrite: deleted {', '.join(found)}", file=sys.stderr, flush=True)
