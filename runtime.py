"""Run-time plumbing for train.py; nothing here is SFTKey. The loop meets it through one-line hooks: `Dist` (this
process's place in a torchrun job), `StopSignal` (a stop signal ends the run after the step in flight), `Meter`
(tokens/s, MFU, ETA), and the flags: `FLAGS` classifies each, `check_config` refuses bad ones."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import signal
import sys
import threading
import time
from typing import Callable

import torch

import data as D
import sftkey

# Device and dtype
def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bf16 in hardware (CUDA from Ampere, CPUs with AVX-512 BF16): emulated, it is slow."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability(device)[0] >= 8
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def resolve_device(cfg, dist: Dist | None = None) -> tuple[str, torch.dtype]:
    """The device and compute dtype the --device and --dtype flags ask for on this machine."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if dist is not None and dist.world > 1 and device.startswith("cuda"):
        device = f"cuda:{dist.local_rank}"  # one GPU per rank, the one NCCL's tensors (Dist.device) live on
    # auto: on a CPU with AVX-512 BF16, bf16 was 0.7x float32's speed at width 128 and faster at 384 (bench.py)
    bf16 = native_bf16(device) and (device.startswith("cuda") or cfg.n_embd >= 256)
    return device, (torch.bfloat16 if bf16 else torch.float32) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)


def machine(device: str, dtype: torch.dtype) -> dict:
    """What a run's arithmetic depends on besides its flags: the dtype --dtype auto chose, another CPU kernel width
    (AVX2, AVX512), thread count, PyTorch or CUDA sum in another order, and at this size that moves results."""
    return {"dtype": str(dtype).removeprefix("torch."), "device": device_name(device),
            "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda}


MACHINE_LINE = "{dtype} | {device}, {cpu_kernels} CPU kernels, {threads} threads, PyTorch {torch}"  # machine()


def device_name(device: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The GPU's name, or the CPU model as Linux gives it in `cpuinfo` (platform's guess elsewhere)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, StopIteration), open(cpuinfo) as f:  # no such file; no model named in it
        return next(name for line in f if line.startswith("model name") and (name := line.partition(":")[2].strip()))
    return platform.processor() or "CPU"


def device_problem(device: str, kinds: tuple[str, ...] = ("cpu", "cuda")) -> str | None:
    """Why a --device other than auto cannot run here (`kinds`: the device types the code supports), or None."""
    try:
        kind, index = torch.device(device).type, torch.device(device).index or 0
    except RuntimeError:
        return f"--device {device}: not a device; use auto, cpu, cuda or cuda:N"
    if kind not in kinds:  # meta, xpu, ...: a traceback deep inside the run otherwise
        return f"--device {device}: not a device this runs on; use auto, {', '.join(kinds)} or cuda:N"
    if kind == "cuda" and index >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def autocast(device: str, dtype: torch.dtype):
    """bf16 autocast: matmuls in bfloat16, weights and optimizer state in float32 (no loss scaling needed)."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.split(":")[0], dtype=dtype)


def set_up_device(cfg, dist: Dist | None = None) -> tuple:
    """(cfg with --dtype auto resolved, as --resume compares it; device; dtype), seeded by rank (dropout differs; DDP
    copies rank 0's weights); on CUDA, TF32 and no cuDNN attention (a new plan per width: 185 ms, not 40 ms)."""
    device, dtype = resolve_device(cfg, dist)
    torch.manual_seed(cfg.seed + (dist.rank if dist else 0))
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_cudnn_sdp(False)  # flash attention then, the fastest in the same test
    return dataclasses.replace(cfg, dtype=str(dtype).removeprefix("torch.")), device, dtype


COMPILE_BACKEND = "SFTKEY_COMPILE_BACKEND"  # environment variable: tests use "eager"/"aot_eager" (no C++ build)


def compiled(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`model`, or for --compile torch.compile'd with dynamic shapes: one graph for every width (length grouping)."""
    return torch.compile(model, dynamic=True, backend=os.environ.get(COMPILE_BACKEND, "inductor")) if enabled else model


# Data parallelism
@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where the collectives' tensors live: the rank's GPU with NCCL, the CPU with gloo

    @property
    def master(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, cfg) -> Dist:
        if "RANK" not in os.environ:  # torchrun sets RANK, WORLD_SIZE and LOCAL_RANK
            return cls()
        cuda = cfg.device != "cpu" and torch.cuda.is_available()
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
        local_rank = int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local_rank)
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank,
                   f"cuda:{local_rank}" if cuda else "cpu")

    def wrap(self, model: torch.nn.Module, device: str) -> torch.nn.Module:
        """The module to call in training: DDP around `model` when there are several ranks."""
        ids = [device] if device.startswith("cuda") else None
        return model if self.world == 1 else torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, net: torch.nn.Module, last_micro_batch: bool):
        """Gradient accumulation: DDP all-reduces the gradients on the last micro-batch of a step only."""
        return net.no_sync() if self.world > 1 and not last_micro_batch else contextlib.nullcontext()

    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(value, op=getattr(torch.distributed.ReduceOp, op.upper()))
        return value

    def print(self, text: str) -> None:  # once for the job: rank 0 speaks for every rank
        if self.master:
            print(text, flush=True)

    def any(self, *flags: bool) -> list[bool]:
        """Each flag, true when it is true on any rank: every rank then decides alike."""
        return [v > 0 for v in self.all_reduce(torch.tensor(flags, device=self.device).float(), "max").tolist()]

    def gather(self, value) -> list:
        """`value` of every rank, in rank order (a collective: every rank calls it)."""
        out = [value] * self.world  # each entry replaced by its rank's in a torchrun job
        if self.world > 1:
            torch.distributed.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.world > 1:  # together: a rank leaving while rank 0 still writes could abort the job
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


# Stop signals
class Interrupted(BaseException):
    """A stop signal ended the run: a BaseException, as KeyboardInterrupt, so no `except Exception` may swallow it."""


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))  # HUP: ssh


class StopSignal:
    """SIGINT, SIGTERM and SIGHUP while a run lasts (the handlers found put back after), each ending it in one line
    (`after`: what is kept, how to go on), exit 130: at once outside `deferred()`, else once the work in it is saved."""

    def __init__(self, after: str = "no training since the last checkpoint is lost; to continue, run the same "
                                    "command again (with --resume if it trains)"):
        self.received, self.name, self.after = False, "", after  # the name of the first signal received
        self._depth, self._previous = 0, {}  # how many deferred() blocks are open; the handlers found

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received:
            print(f"{name} received again: already stopping, once the step or write in flight is saved (kill -9 "
                  f"would stop at once and lose it)", file=sys.stderr, flush=True)
            return
        self.received, self.name = True, name
        if not self._depth:
            raise Interrupted(f"{name} received: the run ends here; {self.after}")
        print(f"\n{name} received: stopping once the step or write in flight is saved", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def deferred(self):
        """A block a signal does not cut short: one received inside raises Interrupted at the loop's next check
        (after_step) or as the block ends, unless an exception is already on its way out. Blocks may nest."""
        already, self._depth = self.received, self._depth + 1
        try:
            yield self
        finally:
            self._depth -= 1
        if self.received and not already and not self._depth:
            raise Interrupted(f"{self.name} received: the run ends here; {self.after}")

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            try:
                with self.deferred():  # a signal between two installs is held until all are in place,
                    for sig in STOP_SIGNALS:
                        self._previous[sig] = signal.signal(sig, self._handle)
            except BaseException:  # then raised here, with the handlers found put back
                self._restore()
                raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            with self.deferred():  # likewise while they go back
                self._restore()
        except Interrupted:  # a run that ended as a signal came still exits 130; an error on its way out goes on
            if exc_type is None:
                raise

    def _restore(self) -> None:
        while self._previous:
            signal.signal(*self._previous.popitem())


def non_finite_message(stage: sftkey.Stage, step: int, path: str | None) -> str:
    """Why train() stops at a non-finite loss or gradient: where, what checkpoint is left, the likely causes."""
    weight = (f"a loss weight of {max(stage.weights):g} (--weights, --stage2_weights or --key_weight), infinite in "
              f"float32" if max(stage.weights) > torch.finfo(torch.float32).max else "")
    causes = ("No update had been made in this stage, so its learning rate is not the cause; look at "  # step 0
              + (weight or "the data and the weights the stage started from") if step == 0 else
              f"Likely causes: a learning rate too high (this stage's peak is {stage.lr:g}: lower --lr, or --stage2_lr "
              f"in stage 2)" + (f", or {weight}" if weight else ""))
    try:  # mmap: only the step is read, not the weights
        last = (f"The last checkpoint, {path} at step "
                f"{torch.load(path, map_location='cpu', weights_only=True, mmap=True)['step']}, is intact"
                if path and os.path.isfile(path) else f"No checkpoint has been written to {path} yet" if path
                else "This stage writes no checkpoint")
    except Exception as err:  # a message about the failure must not fail: say what happened
        last = f"{path} exists but could not be read back ({type(err).__name__})"
    return f"{stage.name} step {step}: the loss or gradient is not finite; stopped before the update. {last}. {causes}."


# Throughput and MFU

# Dense bf16 tensor-core peaks (FLOP/s, FP32 accumulation as autocast uses) from NVIDIA's data sheets, keyed by
# "model [variant]". A name matches when it holds the model token and exactly the variant tokens: "NVIDIA H100
# 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" is not; "NVIDIA L40" and "RTX 3090 Ti" match nothing (no MFU).
_GPU_VARIANTS = {"pcie", "nvl", "ti", "laptop", "mobile", "super", "d"}
_GPU_BF16_PEAKS = {"b200": 2250e12, "h200": 989e12, "h200 nvl": 835e12, "gh200": 989e12,  # GH200: an H100/H200 SXM
                   "h100": 989e12, "h100 pcie": 756e12, "h100 nvl": 835e12, "a100": 312e12, "a100 pcie": 312e12,
                   "l40s": 362e12, "l4": 121e12, "4090": 165.2e12, "3090": 71e12}


def gpu_bf16_peak(name: str) -> float | None:
    """The data-sheet dense bf16 peak of a GPU from its torch.cuda.get_device_name, or None if unknown."""
    tokens = set(re.findall(r"[a-z0-9]+", name.lower()))
    return next((peak for key, peak in _GPU_BF16_PEAKS.items()  # "model variant...": keys split into tokens
                 if key.split()[0] in tokens and tokens & _GPU_VARIANTS == set(key.split()[1:])), None)


def peak_flops(device: str, dtype: torch.dtype) -> float | None:
    """A known GPU's data-sheet bf16 peak FLOP/s for MFU, else None (timed CPU peaks moved by 2x on shared machines)."""
    on_gpu = device.startswith("cuda") and dtype == torch.bfloat16
    return gpu_bf16_peak(torch.cuda.get_device_name(device)) if on_gpu else None


def mfu(model, tokens_per_s: float, seq_len: float, projected_fraction: float, peak: float) -> float:
    """Model FLOPs utilisation: GPT.flops_per_token (mean padded width, share projected) x tokens/s over `peak`."""
    return model.flops_per_token(seq_len, projected_fraction) * tokens_per_s / peak


class Meter:
    """One stage's log lines (loss, tokens/s, MFU, ETA); token counts stay on the device (no GPU wait) until logged."""

    def __init__(self, model, cfg, dist: Dist, device: str, iters: int, first_step: int, peak: float | None):
        self.model, self.cfg, self.dist, self.peak = model, cfg, dist, peak
        self.iters, self.first_step, self.start, self.paused_seconds = iters, first_step, time.time(), 0.0
        # non-padding input positions, positions the model ran (padding included), positions with a loss weight
        self.real, self.computed, self.projected = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))

    def count(self, roles: torch.Tensor, weights: torch.Tensor) -> None:
        self.real += (roles != sftkey.PAD).sum()
        self.computed += roles.numel()
        self.projected += (weights != 0).sum()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (validation) counts neither in tokens/s nor in the ETA."""
        t0 = time.time()
        yield
        self.paused_seconds += time.time() - t0

    def validation_line(self, stage: str, step: int, val: dict[str, float]) -> dict:
        """The validation row of `step` (for results.json), printed."""
        answers = "".join(f" {k.capitalize()} {val[k]:.3f}" for k in ("acc", "fmt") if val.get(k) is not None)
        self.dist.print(f"{stage} step {step:5d} | val loss: thinking {val['thinking']:.4f} | key {val['key']:.4f}"
                        + (f" | answers:{answers}" if answers else ""))
        return {"stage": stage, "step": step, **{f"val_{k}": v for k, v in val.items()}}

    def line(self, stage, step: int, lr: float, step_loss: torch.Tensor) -> dict:
        """The log row of `step` of `stage` (a sftkey.Stage), printed; a DFT stage's loss is DFT's objective: marked."""
        dist, done = self.dist, step + 1
        loss = float(dist.all_reduce(step_loss.detach().clone())) / dist.world
        real, computed, projected = dist.all_reduce(torch.stack([self.real, self.computed, self.projected])).tolist()
        busy = (elapsed := time.time() - self.start) - self.paused_seconds
        rate, eta = real / busy, busy / (done - self.first_step) * (self.iters - done)
        row = {"stage": stage.name, "step": step, "lr": lr, "loss": loss, "tokens_per_s": rate}
        row.update({"dft": True} if stage.dft else {})
        if self.peak:  # FLOPs per computed position at the mean padded width, times positions per second
            width = computed / ((done - self.first_step) * self.cfg.grad_accum * dist.world * self.cfg.batch_size)
            row["mfu"] = mfu(self.model, computed / busy, width, projected / computed, self.peak * dist.world)
        dist.print(f"{stage.name} step {step:5d}/{self.iters} | lr {lr:.2e} | loss {loss:.4f} | {rate:,.0f} tok/s"
                   + (f" | MFU {row['mfu']:.1%}" if self.peak else "")
                   + f" | {clock(elapsed)} elapsed | ETA {clock(eta)}")
        return row


def clock(seconds: float) -> str:
    return f"{int(seconds) // 3600}:{int(seconds) // 60 % 60:02d}:{int(seconds) % 60:02d}"


def number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_setup(sets: list, test: list, model, device: str, dist: Dist, dtype: torch.dtype, stages: list = ()) -> None:
    """The training and validation sets, the test set (and how many of its prompts were trained on), the model."""
    print("\n".join([*(format_summary(s.summary) for s in sets), test_line(sets, test)]))
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers, {model.config.n_embd} "
          f"wide | device {device} x{dist.world} | " + MACHINE_LINE.format(**machine(device, dtype)))
    for k, stage in enumerate(stages, 1):
        p, t, a = (f"{w:g}" for w in stage.weights)
        print(f"stage {k}: {stage.name} | loss weights prompt {p}, thinking {t}, answer {a}"
              f"{', each x its probability (DFT)' * stage.dft} | {stage.iters} steps | peak lr {stage.lr:g}")


def test_line(sets: list, test: list) -> str:
    """How many test examples, and how many of their prompts the training or validation `sets` hold (compared as the
    model reads them, `sftkey.prompt_head`: a trailing space or newline does not make a prompt new)."""
    trained = {sftkey.prompt_head(ex.prompt) for s in sets for ex in s.examples}
    seen = sum(sftkey.prompt_head(ex.prompt) in trained for ex in test)  # Acc on those measures recall
    return (f"test: {len(test)} examples" + (f", {seen} of them with a prompt of the training data (--eval_data the "
            f"--data file?): Acc on those measures recall, not the method" if seen else "") if test else "test: none "
            "(--data without --eval_data, or --n_test 0): every stage is trained and checkpointed, none is evaluated")


def format_summary(summary: dict) -> str:
    """One line of a tokenized set's summary (data.tokenize's), and the bad lines --skip_bad_lines skipped."""
    s, skipped = summary, summary.get("skipped_bad_lines", 0)
    other = f", {s['dropped_in_other_layout']} more in the other layout" if s.get("dropped_in_other_layout") else ""
    return (f"{s['name']}: {s['examples']} examples ({s['dropped_too_long']} dropped as too long{other}); tokens per "
            f"example: prompt {s['prompt_tokens_mean']:.1f} (max {s['prompt_tokens_max']}), thinking "
            f"{s['thinking_tokens_mean']:.1f} (max {s['thinking_tokens_max']}), key {s['key_tokens_mean']:.1f} "
            f"(max {s['key_tokens_max']}); key fraction of response {s['key_fraction']:.1%}; straddling tokens "
            f"{s['straddling_tokens']}; prompt-prefix mismatches {s['prompt_prefix_mismatches']}"
            + (f" (the first: {s['first_prompt_prefix_mismatch']})" if s.get("first_prompt_prefix_mismatch") else "")
            + (f"\n  skipped {skipped} bad lines of --data and --eval_data (--skip_bad_lines): "
               + "; ".join(s["bad_lines"][:3]) + (f"; {skipped - 3} more" if skipped > 3 else "") if skipped else ""))


def print_result(stage: str, r: dict, seconds: float) -> None:
    scores = (f"Acc {number(r['acc'])} | Fmt {number(r['fmt'])} | Composite {number(r['composite'])} on {r['n']} "
              f"test examples" if r["n"] else "not evaluated, no test set (give --eval_data)")
    print(f"{stage}: {scores} | trained in {clock(seconds)}", flush=True)
    for sample in r["responses"][:1]:
        print(f"  e.g. {sample['prompt']!r} -> {sample['response']!r} (reference {sample['reference']!r})")


def results_table(results: dict[str, dict]) -> str:
    rows = (f"| {name} | {number(r['acc'])} | {number(r['fmt'])} | {number(r['composite'])} | {r['n']} |"
            for name, r in results.items())
    return "\n".join(["| arm | Acc | Fmt | Composite | n |", "| --- | --- | --- | --- | --- |", *rows])


# Flags
def flag_parser(config_class, description: str) -> argparse.ArgumentParser:
    """One flag per field of the `config_class` dataclass, its help text taken from the field's metadata."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config_class):
        kind = {"action": argparse.BooleanOptionalAction} if f.type == "bool" else {"type": type(f.default)}
        help_text = f.metadata["help"] + " (default: %(default)r)"  # %(default)r: what set_defaults made it, too
        parser.add_argument(f"--{f.name}", default=f.default, help=help_text, **kind)
    parser.add_argument("--config", default="", help="a JSON object of flag values (the \"config\" block of a run's "
                        "results.json repeats that run); flags on the command line override it")
    return parser


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The flags' values (without --config): the defaults, then the --config file's values, then the command line."""
    if path := parser.parse_known_args(argv)[0].config:
        raw, defaults = D.read_input(path, "--config"), vars(parser.parse_args([]))
        try:
            values = json.loads(raw, object_pairs_hook=D.unique_keys)  # a flag given twice: refused, as in data
        except ValueError as err:  # invalid JSON or UTF-8
            raise ValueError(f"--config {path}: not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config {path}: expected a JSON object of flag values")
        for key, value in values.items():
            if key not in defaults or key == "config":
                raise ValueError(f"--config {path}: {key!r} is not a flag")
            if not (type(value) is (kind := type(defaults[key])) or kind is float and type(value) is int  # 3 for 3.0
                    and abs(value) <= sys.float_info.max):  # a larger whole number has no float
                raise ValueError(f"--config {path}: {key!r} must be a JSON {kind.__name__}, got {value!r}")
        parser.set_defaults(**values)
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if k != "config"}


# A weight is 0 or within these bounds: the loss divides by a float32 sum of weights (only their ratios
# matter), which a weight of 1e39 makes infinite and 1e-50 (0 in float32) leaves silently unsupervised.
WEIGHT_RANGE = (1e-6, 1e6)


def parse_weights(text: str, flag: str) -> tuple[float, float, float]:
    """"P,T,K" -> the loss weights of prompt, thinking and answer tokens, or a ValueError naming `flag`."""
    try:
        weights = tuple(float(v) for v in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 3:
        raise ValueError(f"{flag} {text!r}: give three comma-separated numbers, the loss weights of prompt, "
                         f"thinking and answer tokens (e.g. 0,1,1)")
    low, high = WEIGHT_RANGE
    if not all(w == 0 or low <= w <= high for w in weights) or not any(weights):  # also nan, inf, negatives
        raise ValueError(f"{flag} {text}: each weight must be 0 or between {low:g} and {high:g}, and one not 0")
    return weights


def loss_weights(cfg) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Stage 1 and stage 2 loss weights: --weights (or its short forms --key_only, --key_weight), --stage2_weights."""
    if cfg.weights and (cfg.key_only or cfg.key_weight != 1):
        raise ValueError(f"--weights {cfg.weights} sets stage 1's loss; --key_only and --key_weight are short "
                         f"forms of it: give one or the other")
    short = ",".join(repr(w) for w in sftkey.role_weights(cfg.key_only, cfg.key_weight))
    first = parse_weights(cfg.weights, "--weights") if cfg.weights else parse_weights(short, "--key_only/--key_weight")
    return first, parse_weights(cfg.stage2_weights, "--stage2_weights")


def command(work: Callable[[], object], torchrun_worker: bool = False) -> None:
    """`work()` as a command: bad input ends in one line, exit 2; a stop too (a signal: 130; else 1). No traceback.
    A finished `torchrun_worker` skips the interpreter's teardown, where gloo's threads could abort (2 of 40 runs)."""
    try:
        work()
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt, FloatingPointError, OSError) as err:  # OSError: a WriteError too
        print(f"stopped: {str(err) or 'interrupted'}", file=sys.stderr)
        sys.exit(130 if isinstance(err, (Interrupted, KeyboardInterrupt)) else 1)
    except RuntimeError as err:  # in a torchrun job, a collective failing because another rank stopped first
        if os.environ.get("RANK", "0") == "0":
            raise
        print(f"stopped: rank {os.environ['RANK']}: another rank stopped first ({str(err).splitlines()[0][:200]})",
              file=sys.stderr)
        sys.exit(1)
    if torchrun_worker:
        sys.stdout.flush()  # stderr is line-buffered (Python 3.9+), and os._exit flushes nothing
        os._exit(0)


# Every TrainConfig field, classified for each consumer (tests/test_flags.py fails for a field left out):
# (check_config's rule from RULES, or "" for its own rule or none; --resume: "same" value needed, or "free":
# where files go, how often something is printed or written, where the arithmetic runs; experiment.py: "all"
# arms get it as given, the arms derive theirs from it ("arm": E1, E2, λ), set their own ("set"), or why not.)
FLAGS: dict[str, tuple[str, str, str]] = {name: classes for names, classes in [
    ("data format eval_data strip_calculator skip_bad_lines encoding task init_from dtype", ("", "same", "all")),
    ("n_train n_val n_test data_seed warmup_iters seed eval_limit", ("int>=0", "same", "all")),
    ("block_size n_layer n_head n_embd batch_size grad_accum", ("int>=1", "same", "all")),
    ("stage2_lr weight_decay grad_clip", (">=0", "same", "all")),
    ("lr", (">0", "same", "all")), ("dropout", ("[0,1)", "same", "all")), ("min_lr_ratio", ("[0,1]", "same", "all")),
    ("untagged weights key_only stage2_weights stage2_dft", ("", "same", "set")),
    ("key_weight", ("", "same", "arm")), ("max_iters stage2_iters", ("int>=0", "same", "arm")),
    ("out_dir overwrite device compile", ("", "free", "all")),
    ("eval_interval eval_batch_size log_interval", ("int>=1", "free", "all")),
    ("val_acc_n", ("int>=0", "free", "all")), ("show_roles", ("int>=0", "free", "it prints no data (use show.py)")),
    ("resume", ("", "free", "an experiment cannot be resumed (rerun it, or run fewer --arms/--seeds)")),
    ("ckpt_interval", ("int>=0", "free", "arms write no checkpoints on the way (--save_ckpt keeps the final weights)")),
    ("eval_only", ("", "same", "it trains every arm (evaluate one checkpoint with train.py --eval_only)")),
] for name in names.split()}
SYNTHETIC = ("task", "n_train", "n_test", "data_seed")  # the synthetic task's flags, which --data refuses
_LIMIT = 2 ** 63  # a whole number beyond this overflows torch's and numpy's seeds and sizes
RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "int>=1": (lambda v: 1 <= v < _LIMIT, "must be a whole number >= 1"),
    "int>=0": (lambda v: 0 <= v < _LIMIT, "must be a whole number >= 0"),
    ">=0": (lambda v: 0 <= v < math.inf, "must be a finite number >= 0"),  # nan fails every comparison
    ">0": (lambda v: 0 < v < math.inf, "must be a finite number > 0"),
    "[0,1)": (lambda v: 0 <= v < 1, "must lie in [0, 1)"), "[0,1]": (lambda v: 0 <= v <= 1, "must lie in [0, 1]")}


def check_config(cfg):
    """Refuse flags that would fail later (or silently do something else), all in one ValueError; return `cfg`."""
    problems = [f"--{name} {getattr(cfg, name)}: {RULES[rule][1]}" for name, (rule, _, _) in FLAGS.items()
                if rule and not RULES[rule][0](getattr(cfg, name))]
    for name, known in (("format", D.FORMATS), ("task", D.TASKS), ("dtype", ("auto", "float32", "bfloat16"))):
        if getattr(cfg, name) not in known:
            problems.append(f"--{name} {getattr(cfg, name)}: unknown; use one of {', '.join(known)}")
    synthetic = [f"--{n} {getattr(cfg, n)}" for n in SYNTHETIC if getattr(cfg, n) != getattr(type(cfg)(), n)]
    problems += [why for refused, why in (  # flags that contradict each other, or that would do nothing
        (cfg.n_embd % max(cfg.n_head, 1), f"--n_embd {cfg.n_embd} is not a multiple of --n_head {cfg.n_head}"),
        (cfg.data and synthetic, f"{', '.join(synthetic)}: the synthetic task's, which --data replaces (its test "
                                 f"set is --eval_data; --eval_limit N scores its first N)"),
        (cfg.eval_data and not cfg.data, f"--eval_data {cfg.eval_data} needs --data (else the synthetic task is used)"),
        (cfg.resume and cfg.overwrite, f"--resume continues the run in {cfg.out_dir}, --overwrite deletes it"),
        (cfg.eval_only and cfg.data and not cfg.eval_data, "--eval_only with --data needs --eval_data (the test set)"),
        (cfg.eval_only and cfg.resume, "--eval_only trains nothing, so there is nothing to --resume"),
        (cfg.eval_only and not cfg.init_from, "--eval_only evaluates --init_from: give the checkpoint to evaluate"),
        (not cfg.out_dir, "--out_dir is empty; give a folder ('.' for the current one)"),  # '' is no folder
        (os.path.lexists(cfg.out_dir) and not os.path.isdir(cfg.out_dir), f"--out_dir {cfg.out_dir}: not a folder"),
    ) if refused]
    if not (cfg.stage2_iters or cfg.eval_only) and (cfg.stage2_lr or cfg.stage2_weights != type(cfg)().stage2_weights
                                                    or cfg.stage2_dft):
        problems.append("--stage2_lr, --stage2_weights and --stage2_dft set up stage 2; --stage2_iters 0 leaves it out")
    if not (cfg.max_iters or cfg.eval_only) and (cfg.weights or cfg.key_only or cfg.key_weight != 1
                                                 or not cfg.stage2_iters):  # --max_iters 0: no stage 1
        problems.append("--max_iters 0 runs no stage 1: --weights, --key_only and --key_weight, which set it up, are "
                        "refused with it, and it needs --stage2_iters > 0 (--eval_only evaluates a checkpoint)")
    if cfg.stage2_iters > 0 and not cfg.eval_only and cfg.stage2_lr == 0 and cfg.min_lr_ratio == 0:
        problems.append("stage 2 would train at learning rate 0: --stage2_lr 0 means --lr x --min_lr_ratio, and "
                        "--min_lr_ratio is 0; give --stage2_lr > 0, a --min_lr_ratio > 0, or --stage2_iters 0")
    try:
        loss_weights(cfg)
    except ValueError as err:
        problems.append(str(err))
    if cfg.device != "auto" and (problem := device_problem(cfg.device)):
        problems.append(problem)
    if problems:
        raise ValueError("; ".join(problems))
    return cfg
