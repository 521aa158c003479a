"""The training loop, evaluation and the command line.

`python train.py` runs the default experiment offline: stage 1 (SFT-Tag) on the embedded
synthetic task, evaluation, stage 2 (key only, from the stage-1 weights), evaluation, a table and
`results.json`. One loop, `train`, serves both stages; its `weights` (from `--key_only`,
`--key_weight`) are the only difference between them. `python train.py --help` lists the flags.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

import data as D
import sftkey
from model import GPT, GPTConfig


def _flag(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # I/O and data
    out_dir: str = _flag("out", "folder for checkpoints, logs and results.json")
    data: str = _flag("", "training JSONL file; empty = the embedded synthetic arithmetic task")
    format: str = _flag("gsm8k", f"layout of --data and --eval_data: {', '.join(D.FORMATS)}")
    eval_data: str = _flag("", "test JSONL file (same format as --data); synthetic test set when --data is empty")
    strip_calculator: bool = _flag(False, "gsm8k: remove the <<48/2=24>> calculator annotations")
    skip_bad_lines: bool = _flag(False, "skip and count malformed lines of --data/--eval_data instead of stopping "
                                        "at the first one")
    untagged: bool = _flag(False, "write responses as 'reasoning\\n#### answer' instead of the tagged format "
                                  "(the plain SFT baseline; Fmt is then not defined)")
    encoding: str = _flag(D.SYNTHETIC_ENCODING, "tokenizer: sftkey-chars (offline, for the synthetic task), "
                                                "a tiktoken name such as gpt2, or a .tiktoken file")
    n_train: int = _flag(20000, "synthetic task: number of training problems")
    n_val: int = _flag(500, "validation examples carved from the training data (seeded)")
    n_test: int = _flag(500, "synthetic task: number of test problems")
    data_seed: int = _flag(0, "synthetic task: seed of its problems, kept apart from --seed so that runs with "
                              "different seeds are scored on the same test items")
    # the method
    init_from: str = _flag("", "checkpoint to start from (e.g. out/stage1/ckpt.pt), or gpt2:DIR for a Hugging Face "
                               "GPT-2 folder (its shape then comes from the checkpoint); empty = random weights")
    key_only: bool = _flag(False, "put the loss on the answer only (stage 2; Key-Tag when from scratch)")
    key_weight: float = _flag(1.0, "loss weight of answer tokens; > 1 is the single-stage up-weighting control")
    max_iters: int = _flag(1500, "optimizer steps of the (first) stage")
    stage2_iters: int = _flag(300, "then this many key-only steps from the result (0 = a single stage)")
    stage2_lr: float = _flag(0.0, "peak learning rate of stage 2 (0 = lr x min_lr_ratio, where stage 1's schedule "
                                  "ended: stage 2 fine-tunes a converged model)")
    # model
    block_size: int = _flag(96, "longest sequence in tokens; longer examples are dropped and counted")
    n_layer: int = _flag(4, "transformer blocks")
    n_head: int = _flag(4, "attention heads")
    n_embd: int = _flag(128, "width of the residual stream")
    dropout: float = _flag(0.0, "dropout probability")
    # optimisation
    batch_size: int = _flag(32, "sequences per micro-batch")
    grad_accum: int = _flag(1, "micro-batches per optimizer step")
    lr: float = _flag(1e-3, "peak learning rate")
    warmup_iters: int = _flag(100, "linear warm-up steps (capped at a tenth of the stage), then cosine decay")
    min_lr_ratio: float = _flag(0.1, "the cosine decays to lr x this")
    weight_decay: float = _flag(0.1, "AdamW weight decay (matrices and embeddings only)")
    grad_clip: float = _flag(1.0, "clip the gradient norm to this (0 = off)")
    seed: int = _flag(1337, "seed for data generation, order and initialisation")
    # evaluation and logging
    resume: bool = _flag(False, "continue from the checkpoints in --out_dir (same flags as the interrupted run)")
    ckpt_interval: int = _flag(0, "also write a checkpoint every N steps (0 = only at the end of each stage)")
    eval_only: bool = _flag(False, "only evaluate --init_from on the test set")
    eval_limit: int = _flag(0, "evaluate on the first N test examples only (0 = all)")
    eval_interval: int = _flag(250, "steps between validation losses")
    eval_batch_size: int = _flag(64, "prompts generated together at evaluation")
    log_interval: int = _flag(50, "steps between log lines")
    # hardware
    device: str = _flag("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    dtype: str = _flag("auto", "auto (bfloat16 autocast on CUDA from Ampere on, and on CPUs with AVX-512 BF16 when "
                               "--n_embd >= 256, where it is faster), float32, bfloat16")
    compile: bool = _flag(False, "torch.compile the model for training")


# ---------------------------------------------------------------------------------------------
# Hardware

def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware. Elsewhere bf16 is emulated and slow:
    CUDA before Ampere (where is_bf16_supported() is still true), and CPUs without AVX-512 BF16
    (an AMD EPYC here ran a bf16 matmul at 0.3 GFLOP/s against 69 GFLOP/s in float32)."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability(device)[0] >= 8
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def resolve_device(cfg: TrainConfig, dist: Dist | None = None) -> tuple[str, torch.dtype]:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if dist is not None and dist.world > 1 and device == "cuda":
        device = f"cuda:{dist.local_rank}"  # one GPU per rank
    if cfg.dtype == "auto":
        # On a CPU with AVX-512 BF16, bf16 pays off only once matmuls dominate: bench.py measured it
        # 0.7x float32's speed at the default width 128 and faster at 384, so narrow models stay float32.
        bf16 = native_bf16(device) and (device.startswith("cuda") or cfg.n_embd >= 256)
        return device, torch.bfloat16 if bf16 else torch.float32
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {cfg.dtype}: use auto, float32 or bfloat16")
    return device, getattr(torch, cfg.dtype)


def autocast(device: str, dtype: torch.dtype):
    """bf16 autocast: matmuls in bfloat16, weights and optimizer state in float32 (no loss scaling needed)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


# Dense bfloat16 tensor-core peaks from the vendors' data sheets, FLOP/s; longer names first so that
# "L40S" is not taken for "L4". Other devices and dtypes are measured.
_GPU_BF16_PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
                   ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12))


def peak_flops(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The device's peak matmul FLOP/s at `dtype`, for MFU. Call it once, at start-up.

    A known GPU at bfloat16 is looked up; anything else is measured: the best of `repeats` timed
    size x size matrix products (2 * size^3 FLOPs each) after one untimed warm-up. On a CPU shared
    with other work the measurement is only as steady as the machine.
    """
    if device.startswith("cuda") and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_BF16_PEAKS:
            if key in name:
                return peak
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = math.inf
    for i in range(repeats + 1):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        if i > 0:  # the first product pays for kernel selection and page faults
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def mfu(model: GPT, tokens_per_s: float, seq_len: float, projected_fraction: float, peak: float) -> float:
    """Model FLOPs utilisation of training: matmul FLOP/s achieved (GPT.flops_per_token) over `peak`.

    `tokens_per_s` counts real (non-padding) input positions, `seq_len` is the mean padded width of
    the micro-batches, `projected_fraction` the share of real positions with a non-zero loss weight
    (the ones projected onto the vocabulary), `peak` comes from peak_flops.
    """
    return model.flops_per_token(seq_len, projected_fraction) * tokens_per_s / peak


# ---------------------------------------------------------------------------------------------
# Data and model

def load_data(cfg: TrainConfig, enc) -> tuple[D.TokenizedSet, D.TokenizedSet, list[D.Example]]:
    """(train, validation) tokenized sets and the test examples."""
    bad_lines: list[str] = []  # with --skip_bad_lines, "file:line: problem" of each skipped line
    if cfg.data:
        examples = D.read_examples(cfg.data, cfg.format, cfg.strip_calculator, cfg.skip_bad_lines, bad_lines)
        test = (D.read_examples(cfg.eval_data, cfg.format, cfg.strip_calculator, cfg.skip_bad_lines, bad_lines)
                if cfg.eval_data else [])
    else:
        everything = D.synthetic_task(cfg.n_train + cfg.n_test, cfg.data_seed)
        examples, test = everything[:cfg.n_train], everything[cfg.n_train:]
    train_examples, val_examples = D.split(examples, cfg.n_val, cfg.seed)
    if not val_examples:
        raise D.DataError(f"{cfg.data or 'synthetic task'}: {len(examples)} examples leave no validation set, which "
                          f"takes --n_val {cfg.n_val} but at most a tenth of them; use --n_val >= 1 and >= 10 examples")
    tagged = not cfg.untagged
    train_set = D.tokenize(train_examples, enc, cfg.block_size, tagged, name=cfg.data or "synthetic train")
    val_set = D.tokenize(val_examples, enc, cfg.block_size, tagged, name="validation")
    if bad_lines:
        train_set.summary.update(skipped_bad_lines=len(bad_lines), bad_lines=bad_lines[:10])
    test = test[:cfg.eval_limit] if cfg.eval_limit else test
    # A test prompt that fills the block leaves no room to answer: say so now, not after training.
    too_long = [ex for ex in test if len(enc.encode_ordinary(ex.prompt + sftkey.PROMPT_SEP)) >= cfg.block_size]
    if too_long:
        raise D.DataError(f"{too_long[0].source or 'test set'}: the prompt alone fills --block_size {cfg.block_size} "
                          f"tokens, leaving no room for a response ({len(too_long)} test prompts do); raise --block_size")
    return train_set, val_set, test


PRETRAINED = "gpt2:"  # --init_from gpt2:DIR loads a Hugging Face GPT-2 checkpoint folder


def model_config(cfg: TrainConfig, enc) -> GPTConfig:
    """The shape the flags ask for. Our own models round the vocabulary up to a multiple of 64, which
    keeps the matmuls efficient; GPT-2's weights (and checkpoints trained from them) keep 50,257."""
    vocab = 64 * math.ceil(enc.n_vocab / 64)
    return GPTConfig(vocab, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout)


def build_model(cfg: TrainConfig, enc, device: str) -> GPT:
    """Random weights, the weights of an --init_from checkpoint, or GPT-2's (--init_from gpt2:DIR)."""
    if cfg.init_from.startswith(PRETRAINED):
        return pretrained_model(cfg, enc).to(device)
    mconf = model_config(cfg, enc)
    if not cfg.init_from:
        return GPT(mconf).to(device)
    if not os.path.isfile(cfg.init_from):
        raise FileNotFoundError(f"--init_from {cfg.init_from}: no such file")
    return load_checkpoint(cfg.init_from, mconf, device, encoding=cfg.encoding, exact_vocab=enc.n_vocab)[0]


def pretrained_model(cfg: TrainConfig, enc) -> GPT:
    """GPT-2 from --init_from gpt2:DIR: its shape from the checkpoint (--n_layer, --n_head and --n_embd
    do not apply), the position table cropped to --block_size, the tokenizer GPT-2's own."""
    if enc.name != "gpt2":
        raise ValueError(f"--init_from {cfg.init_from} needs --encoding gpt2 (GPT-2's own tokenizer), "
                         f"got --encoding {cfg.encoding}")
    model = GPT.from_pretrained(cfg.init_from[len(PRETRAINED):], block_size=cfg.block_size, dropout=cfg.dropout)
    if model.config.vocab_size != enc.n_vocab:
        raise ValueError(f"--init_from {cfg.init_from}: a vocabulary of {model.config.vocab_size} tokens, but the "
                         f"gpt2 encoding has {enc.n_vocab}")
    return model


# The flag that sets each model-config field, to name it when a checkpoint does not match.
_CONFIG_FLAGS = {"vocab_size": "--encoding", "block_size": "--block_size", "n_layer": "--n_layer",
                 "n_head": "--n_head", "n_embd": "--n_embd", "dropout": "--dropout"}


def read_checkpoint(path: str, expected: GPTConfig, device: str, encoding: str | None = None,
                    exact_vocab: int | None = None) -> dict:
    """A checkpoint's contents, after checking its model shape (and `encoding`, if given) matches the flags.

    A checkpoint whose vocabulary is `exact_vocab` (the encoding's own size, not rounded up: one
    trained from GPT-2's weights) is accepted as well as the rounded size `expected` holds.

    Loading never runs code: torch.load with weights_only=True accepts tensors and plain Python
    values only, and anything else is refused with a ValueError naming the file and the problem.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol draws a warning; the refusal below says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=device, weights_only=True)  # never unpickle code
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


def save_checkpoint(path: str, model: GPT, optimizer, cfg: TrainConfig, step: int, extra: dict | None = None) -> None:
    """Tensors and plain values only (loadable with weights_only=True), written to a temporary file
    and then renamed, so a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
             "model_config": dataclasses.asdict(model.config), "train_config": dataclasses.asdict(cfg),
             "step": step, "rng": torch.get_rng_state(), **(extra or {})}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint was written and the run can be resumed."""


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, cfg: TrainConfig) -> Dist:
        if "RANK" not in os.environ:  # torchrun sets RANK, WORLD_SIZE and LOCAL_RANK
            return cls()
        import datetime
        cuda = cfg.device != "cpu" and torch.cuda.is_available()
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
        dist = cls(torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ["LOCAL_RANK"]))
        if cuda:
            torch.cuda.set_device(dist.local_rank)
        return dist

    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(value, op=getattr(torch.distributed.ReduceOp, op.upper()))
        return value

    def close(self) -> None:
        if self.world > 1:
            torch.distributed.destroy_process_group()


class StopSignal:
    """Turns the first SIGINT/SIGTERM into a request the loop honours after the current step.

    A second signal interrupts at once. Handlers are installed only inside the `with` block.
    """

    def __init__(self):
        self.received = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = True
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then writing a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, dist: Dist) -> bool:
        """Whether to stop now; with several ranks, stop when any rank got the signal (all agree)."""
        if dist.world == 1:
            return self.received
        flag = torch.tensor(float(self.received), device="cuda" if torch.cuda.is_available() else "cpu")
        return bool(dist.all_reduce(flag, op="max"))


# ---------------------------------------------------------------------------------------------
# The loop

def stage2_peak_lr(cfg: TrainConfig) -> float:
    return cfg.stage2_lr or cfg.lr * cfg.min_lr_ratio


def lr_at(step: int, iters: int, peak: float, cfg: TrainConfig) -> float:
    warmup = min(cfg.warmup_iters, iters // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, iters - warmup)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: GPT, train_set: D.TokenizedSet, val_set: D.TokenizedSet, cfg: TrainConfig,
          weights: tuple[float, float, float], iters: int, peak_lr: float, stage: str,
          device: str, dtype: torch.dtype, log: list[dict], ckpt_path: str | None = None,
          resume: dict | None = None, dist: Dist | None = None, stop: StopSignal | None = None,
          extra: dict | None = None, steps_before: int = 0, peak: float | None = None) -> torch.optim.Optimizer:
    """Train `iters` optimizer steps with per-role loss `weights`. Both stages run through here.

    The loss of a step is sum(weight x token loss) / sum(weight), both sums over all micro-batches
    of the step and all ranks, so every supervised token counts the same however the batch is cut.
    `resume` (a checkpoint of this stage) restores the optimizer, the step and the RNG; the data
    order and learning rate are functions of the step, so the run continues exactly. Checkpoints go
    to `ckpt_path` every --ckpt_interval steps and when `stop` reports SIGINT/SIGTERM; `extra` is
    stored in them too (what run() needs to resume the stages around this one). `steps_before`
    counts the steps earlier stages took on this data, so the data stream continues after them.
    `peak` (FLOP/s of the device, from peak_flops) adds the MFU to the log.
    """
    dist = dist or Dist()
    optimizer = model.configure_optimizer(peak_lr, cfg.weight_decay, (0.9, 0.95), device.split(":")[0])
    first_step, earlier_seconds = 0, 0.0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        first_step, earlier_seconds = resume["step"], resume.get("elapsed", 0.0)
        torch.set_rng_state(resume["rng"].cpu())
    net = torch.compile(model) if cfg.compile else model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.startswith("cuda") else None)
    batches = D.Batches(train_set, cfg.batch_size, cfg.seed)
    start, val_seconds = time.time(), 0.0
    # real tokens, computed positions (with padding), projected positions: summed on the device, read at log time
    counts = torch.zeros(3, device=device)

    def checkpoint(step: int) -> None:
        if ckpt_path and dist.master:
            save_checkpoint(ckpt_path, model, optimizer, cfg, step, {"stage": stage, "log": log, **(extra or {}),
                                                                     "elapsed": earlier_seconds + time.time() - start})

    for step in range(first_step, iters):
        lr = lr_at(step, iters, peak_lr, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Rank r takes every world-th micro-batch: N ranks see the global batch one process would.
        micro = [batches.get(((steps_before + step) * cfg.grad_accum + i) * dist.world + dist.rank, device)
                 for i in range(cfg.grad_accum)]
        micro_weights = [sftkey.token_weights(roles, weights) for _, _, roles in micro]
        total_weight = dist.all_reduce(sum(w.sum() for w in micro_weights))
        # DDP averages gradients over ranks; multiplying by world turns that average into the sum.
        scale = dist.world / total_weight.clamp(min=1e-8)  # an all-zero step gives zero loss, not NaN
        step_loss = torch.zeros((), device=device)
        model.train()
        for i, ((x, y, roles), w) in enumerate(zip(micro, micro_weights)):
            last_micro = i == cfg.grad_accum - 1
            with net.no_sync() if dist.world > 1 and not last_micro else contextlib.nullcontext():
                with autocast(device, dtype):
                    loss = sftkey.weighted_loss_sum(net(x), model.lm_head, y, w) * scale
                loss.backward()
            step_loss += loss.detach() / dist.world
            counts += torch.stack([(roles != sftkey.PAD).sum(), torch.tensor(roles.numel()), (w != 0).sum()])
        # The norm is the same on every rank; checking it before the update keeps the weights good.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not torch.isfinite(norm):
            raise FloatingPointError(f"{stage} step {step}: the loss or gradient is not finite; stopping before the "
                                     f"update. The last checkpoint in {cfg.out_dir} is intact; try a lower --lr.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        if step % cfg.log_interval == 0 or done == iters:
            step_loss = float(dist.all_reduce(step_loss))
            elapsed = time.time() - start
            real, computed, projected = dist.all_reduce(counts.clone()).tolist()
            rate = real / (elapsed - val_seconds)  # training throughput: validation time left out
            eta = (elapsed - val_seconds) / (done - first_step) * (iters - done)
            row = {"stage": stage, "step": step, "lr": lr, "loss": step_loss, "tokens_per_s": rate}
            if peak:  # FLOPs per computed position at the mean padded width, times positions per second
                width = computed / ((done - first_step) * cfg.grad_accum * dist.world * cfg.batch_size)
                row["mfu"] = mfu(model, computed / (elapsed - val_seconds), width, projected / computed, peak * dist.world)
            if dist.master:
                print(f"{stage} step {step:5d}/{iters} | lr {lr:.2e} | loss {step_loss:.4f} | {rate:,.0f} tok/s"
                      + (f" | MFU {row['mfu']:.1%}" if peak else "")
                      + f" | {_clock(elapsed)} elapsed | ETA {_clock(eta)}", flush=True)
            log.append(row)
        if dist.master and (step % cfg.eval_interval == 0 or done == iters):
            t0 = time.time()
            val = validation_loss(model, val_set, cfg, device, dtype)
            val_seconds += time.time() - t0
            print(f"{stage} step {step:5d} | val loss: thinking {val['thinking']:.4f} | key {val['key']:.4f}",
                  flush=True)
            log.append({"stage": stage, "step": step, **{f"val_{k}": v for k, v in val.items()}})
        stopping = stop is not None and stop.requested(dist)
        if stopping or (cfg.ckpt_interval and done % cfg.ckpt_interval == 0 and done < iters):
            checkpoint(done)
        if stopping:
            raise Interrupted(f"{stage} stopped by signal after step {done} of {iters}; checkpoint written to "
                              f"{ckpt_path}. Resume with the same command and --resume.")
    return optimizer


@torch.no_grad()
def validation_loss(model: GPT, val_set: D.TokenizedSet, cfg: TrainConfig, device: str,
                    dtype: torch.dtype) -> dict[str, float]:
    """Mean next-token loss on thinking tokens and on key tokens of the validation set (any stage)."""
    model.eval()
    sums = torch.zeros(3, device=device)
    counts = torch.zeros(3, device=device)
    for start in range(0, len(val_set.ids), cfg.batch_size):
        x, y, roles = D.collate(val_set.ids[start:start + cfg.batch_size],
                                val_set.roles[start:start + cfg.batch_size], device)
        with autocast(device, dtype):
            hidden = model(x)
        for role in (sftkey.THINK, sftkey.KEY):
            w = sftkey.token_weights(roles, tuple(float(r == role) for r in range(3)))  # this role only
            with autocast(device, dtype):
                sums[role] += sftkey.weighted_loss_sum(hidden, model.lm_head, y, w)
            counts[role] += w.sum()
    mean = (sums / counts.clamp(min=1)).tolist()
    return {"thinking": mean[sftkey.THINK], "key": mean[sftkey.KEY]}


# ---------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model: GPT, enc, examples: list[D.Example], cfg: TrainConfig, device: str,
             dtype: torch.dtype) -> dict:
    """Greedy answers to the test prompts; Acc, Fmt (tagged only) and the composite score."""
    model.eval()
    tagged = not cfg.untagged
    prompts = [enc.encode_ordinary(ex.prompt + sftkey.PROMPT_SEP) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    correct, formatted = [False] * len(examples), [False] * len(examples)
    samples = []
    for start in range(0, len(order), cfg.eval_batch_size):
        rows = order[start:start + cfg.eval_batch_size]
        with autocast(device, dtype):
            outs = model.generate([prompts[i] for i in rows], cfg.block_size, enc.eot_token, n_vocab=enc.n_vocab)
        for i, out in zip(rows, outs):
            ended = bool(out) and out[-1] == enc.eot_token
            response = enc.decode(out[:-1] if ended else out)
            correct[i] = sftkey.answers_match(sftkey.extract_answer(response, tagged), examples[i].answer)
            formatted[i] = sftkey.format_ok(response, ended)
            if len(samples) < 3:
                samples.append({"prompt": examples[i].prompt, "response": response, "reference": examples[i].answer})
    acc = float(np.mean(correct)) if examples else float("nan")
    fmt = float(np.mean(formatted)) if tagged and examples else None
    return {"acc": acc, "fmt": fmt, "composite": sftkey.composite(acc, fmt) if fmt is not None else None,
            "n": len(examples), "correct": correct, "formatted": formatted if tagged else None,
            "samples": samples}


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def results_table(results: dict[str, dict]) -> str:
    lines = ["| arm | Acc | Fmt | Composite | n |", "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {_fmt(r['acc'])} | {_fmt(r['fmt'])} | {_fmt(r['composite'])} | {r['n']} |")
    return "\n".join(lines)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# Command line

def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """One flag per TrainConfig field, its help text taken from the field."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        # %(default)r, not the field's default: a parser that calls set_defaults (experiment.py) shows its own
        flag, help_text = f"--{f.name}", f.metadata["help"] + " (default: %(default)r)"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def run(cfg: TrainConfig) -> dict:
    """Stage 1 (or a single stage), evaluation, then stage 2 and evaluation when stage2_iters > 0.

    Each stage's checkpoint (out_dir/STAGE/ckpt.pt) holds, once the stage is evaluated, its results
    too, so --resume skips finished stages and continues an unfinished one where it stopped.
    """
    dist = Dist.from_environment(cfg)
    device, dtype = resolve_device(cfg, dist)
    torch.manual_seed(cfg.seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    enc = D.get_encoding(cfg.encoding)
    train_set, val_set, test = load_data(cfg, enc)
    model = build_model(cfg, enc, device)
    if dist.master:
        for s in (train_set.summary, val_set.summary):
            print(D.format_summary(s))
        print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers, "
              f"{model.config.n_embd} wide | device {device} x{dist.world} | {str(dtype).replace('torch.', '')}")

    first = "sft" if cfg.untagged else "key_tag" if cfg.key_only else "sft_tag"
    stages = [(first, sftkey.role_weights(cfg.key_only, cfg.key_weight), cfg.max_iters, cfg.lr)]
    if cfg.stage2_iters > 0:
        stages.append(("sftkey_tag", sftkey.role_weights(key_only=True), cfg.stage2_iters, stage2_peak_lr(cfg)))
    results, log, seconds = {}, [], {}
    peak = peak_flops(device, dtype)
    if cfg.eval_only:
        stages, results["init"] = [], evaluate(model, enc, test, cfg, device, dtype)
    with StopSignal() as stop:
        for k, (name, weights, iters, lr) in enumerate(stages):
            steps_done = sum(stage[2] for stage in stages[:k])  # stage 2 reads on where stage 1 stopped
            path = os.path.join(cfg.out_dir, name, "ckpt.pt")
            saved = read_checkpoint(path, model.config, device) if cfg.resume and os.path.exists(path) else None
            if saved is not None:
                model.load_state_dict(saved["model"])
                log[:], results, seconds = saved["log"], saved["results"], saved["seconds"]
                if name in results:  # finished and evaluated before the interruption
                    continue
            t0 = time.time() - (saved.get("elapsed", 0.0) if saved else 0.0)
            optimizer = train(model, train_set, val_set, cfg, weights, iters, lr, name, device, dtype, log,
                              ckpt_path=path, resume=saved, dist=dist, stop=stop, steps_before=steps_done, peak=peak,
                              extra={"results": results, "seconds": seconds})
            seconds[name] = time.time() - t0
            if not dist.master:
                continue
            state = {"stage": name, "log": log, "results": results, "seconds": seconds, "elapsed": seconds[name]}
            save_checkpoint(path, model, optimizer, cfg, iters, state)  # the stage's weights, before evaluating
            results[name] = r = evaluate(model, enc, test, cfg, device, dtype)
            save_checkpoint(path, model, optimizer, cfg, iters, state)  # now with its results: resume skips it
            print(f"{name}: Acc {_fmt(r['acc'])} | Fmt {_fmt(r['fmt'])} | Composite {_fmt(r['composite'])} "
                  f"on {r['n']} test examples | trained in {_clock(seconds[name])}", flush=True)
            for sample in r["samples"][:1]:
                print(f"  e.g. {sample['prompt']!r} -> {sample['response']!r} (reference {sample['reference']!r})")
    summary = {"config": dataclasses.asdict(cfg), "data": [train_set.summary, val_set.summary],
               "results": results, "train_seconds": seconds, "log": log}
    if dist.master:
        print(results_table(results))
        write_json(os.path.join(cfg.out_dir, "results.json"), summary)
    dist.close()
    return summary


def check_config(cfg: TrainConfig) -> None:
    """Refuse flag values that would fail later (or silently do something else), before anything runs."""
    positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_batch_size",
                "log_interval", "eval_interval")
    non_negative = ("n_train", "n_val", "n_test", "max_iters", "stage2_iters", "warmup_iters", "ckpt_interval",
                    "eval_limit", "key_weight", "stage2_lr", "weight_decay", "grad_clip")
    problems = [f"--{name} {getattr(cfg, name)}: must be at least 1" for name in positive if getattr(cfg, name) < 1]
    problems += [f"--{name} {getattr(cfg, name)}: must be >= 0" for name in non_negative
                 if not getattr(cfg, name) >= 0]  # `not >=` also catches nan
    for name in ("lr", "key_weight", "stage2_lr", "weight_decay", "grad_clip", "dropout", "min_lr_ratio"):
        if not math.isfinite(getattr(cfg, name)):
            problems.append(f"--{name} {getattr(cfg, name)}: must be a finite number")
    if not cfg.lr > 0:
        problems.append(f"--lr {cfg.lr}: must be > 0")
    if not 0 <= cfg.dropout < 1 or not 0 <= cfg.min_lr_ratio <= 1:
        problems.append(f"--dropout {cfg.dropout} / --min_lr_ratio {cfg.min_lr_ratio}: must lie in [0, 1)/[0, 1]")
    if cfg.n_head >= 1 and cfg.n_embd % cfg.n_head:
        problems.append(f"--n_embd {cfg.n_embd} is not a multiple of --n_head {cfg.n_head}")
    if cfg.format not in D.FORMATS:
        problems.append(f"--format {cfg.format}: unknown; use one of {', '.join(D.FORMATS)}")
    if cfg.eval_data and not cfg.data:
        problems.append(f"--eval_data {cfg.eval_data} needs --data (without it the synthetic task is used)")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        problems.append(f"--dtype {cfg.dtype}: use auto, float32 or bfloat16")
    if cfg.device != "auto":
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            device = None
            problems.append(f"--device {cfg.device}: not a device; use auto, cpu, cuda or cuda:N")
        if device is not None and device.type == "cuda" and not torch.cuda.is_available():
            problems.append(f"--device {cfg.device}: CUDA is not available on this machine")
    if cfg.init_from.startswith(PRETRAINED):
        if not os.path.isdir(cfg.init_from[len(PRETRAINED):]):
            problems.append(f"--init_from {cfg.init_from}: no such directory")
        if cfg.encoding != "gpt2":
            problems.append(f"--init_from {cfg.init_from} needs --encoding gpt2, got {cfg.encoding}")
    elif cfg.init_from and not os.path.isfile(cfg.init_from):
        problems.append(f"--init_from {cfg.init_from}: no such file")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        problems.append(f"--out_dir {cfg.out_dir}: exists and is not a folder")
    if problems:
        raise ValueError("; ".join(problems))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        check_config(cfg)
        run(cfg)
    except (FileNotFoundError, ValueError) as err:  # bad input or flags: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, FloatingPointError) as err:
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(130 if isinstance(err, Interrupted) else 1)


if __name__ == "__main__":
    main()
