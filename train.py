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
import sys
import time
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
    untagged: bool = _flag(False, "write responses as 'reasoning\\n#### answer' instead of the tagged format "
                                  "(the plain SFT baseline; Fmt is then not defined)")
    encoding: str = _flag(D.SYNTHETIC_ENCODING, "tokenizer: sftkey-chars (offline, for the synthetic task), "
                                                "a tiktoken name such as gpt2, or a .tiktoken file")
    n_train: int = _flag(20000, "synthetic task: number of training problems")
    n_val: int = _flag(500, "validation examples carved from the training data (seeded)")
    n_test: int = _flag(500, "synthetic task: number of test problems")
    # the method
    init_from: str = _flag("", "checkpoint to start from (e.g. out/stage1/ckpt.pt); empty = random weights")
    key_only: bool = _flag(False, "put the loss on the answer only (stage 2; Key-Tag when from scratch)")
    key_weight: float = _flag(1.0, "loss weight of answer tokens; > 1 is the single-stage up-weighting control")
    max_iters: int = _flag(1500, "optimizer steps of the (first) stage")
    stage2_iters: int = _flag(300, "then this many key-only steps from the result (0 = a single stage)")
    stage2_lr: float = _flag(0.0, "peak learning rate of stage 2 (0 = same as --lr)")
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
    eval_only: bool = _flag(False, "only evaluate --init_from on the test set")
    eval_limit: int = _flag(0, "evaluate on the first N test examples only (0 = all)")
    eval_interval: int = _flag(250, "steps between validation losses")
    eval_batch_size: int = _flag(64, "prompts generated together at evaluation")
    log_interval: int = _flag(50, "steps between log lines")
    # hardware
    device: str = _flag("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    dtype: str = _flag("auto", "auto (bfloat16 autocast on CUDA and on CPUs with AVX-512 BF16), float32, bfloat16")
    compile: bool = _flag(False, "torch.compile the model for training")


# ---------------------------------------------------------------------------------------------
# Hardware

def resolve_device(cfg: TrainConfig) -> tuple[str, torch.dtype]:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if cfg.dtype == "auto":
        bf16 = (torch.cuda.is_bf16_supported() if device.startswith("cuda")
                else getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
        return device, torch.bfloat16 if bf16 else torch.float32
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {cfg.dtype}: use auto, float32 or bfloat16")
    return device, getattr(torch, cfg.dtype)


def autocast(device: str, dtype: torch.dtype):
    """bf16 autocast: matmuls in bfloat16, weights and optimizer state in float32 (no loss scaling needed)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Data and model

def load_data(cfg: TrainConfig, enc) -> tuple[D.TokenizedSet, D.TokenizedSet, list[D.Example]]:
    """(train, validation) tokenized sets and the test examples."""
    if cfg.data:
        examples = D.read_examples(cfg.data, cfg.format, cfg.strip_calculator)
        test = D.read_examples(cfg.eval_data, cfg.format, cfg.strip_calculator) if cfg.eval_data else []
    else:
        everything = D.synthetic_task(cfg.n_train + cfg.n_test, cfg.seed)
        examples, test = everything[:cfg.n_train], everything[cfg.n_train:]
    train_examples, val_examples = D.split(examples, cfg.n_val, cfg.seed)
    tagged = not cfg.untagged
    train_set = D.tokenize(train_examples, enc, cfg.block_size, tagged, name=cfg.data or "synthetic train")
    val_set = D.tokenize(val_examples, enc, cfg.block_size, tagged, name="validation")
    return train_set, val_set, test[:cfg.eval_limit] if cfg.eval_limit else test


def model_config(cfg: TrainConfig, enc) -> GPTConfig:
    vocab = 64 * math.ceil(enc.n_vocab / 64)  # a multiple of 64 keeps the matmuls efficient
    return GPTConfig(vocab, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout)


def build_model(cfg: TrainConfig, enc, device: str) -> GPT:
    """Random weights, or the weights of --init_from."""
    mconf = model_config(cfg, enc)
    return load_checkpoint(cfg.init_from, mconf, device)[0] if cfg.init_from else GPT(mconf).to(device)


def load_checkpoint(path: str, expected: GPTConfig, device: str) -> tuple[GPT, dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init_from {path}: no such file")
    ckpt = torch.load(path, map_location=device, weights_only=True)  # never unpickle code
    saved = GPTConfig(**ckpt["model_config"])
    diffs = [f"{k}={getattr(saved, k)} in the checkpoint but {getattr(expected, k)} here"
             for k in vars(saved) if getattr(saved, k) != getattr(expected, k)]
    if diffs:
        raise ValueError(f"--init_from {path} does not match the flags: " + "; ".join(diffs))
    model = GPT(saved).to(device)
    model.load_state_dict(ckpt["model"])
    return model, ckpt


def save_checkpoint(path: str, model: GPT, optimizer, cfg: TrainConfig, step: int) -> None:
    """Write to a temporary file, then rename: a crash mid-write leaves the old checkpoint intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
             "model_config": dataclasses.asdict(model.config), "train_config": dataclasses.asdict(cfg),
             "step": step}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# The loop

def lr_at(step: int, iters: int, peak: float, cfg: TrainConfig) -> float:
    warmup = min(cfg.warmup_iters, iters // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, iters - warmup)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: GPT, train_set: D.TokenizedSet, val_set: D.TokenizedSet, cfg: TrainConfig,
          weights: tuple[float, float, float], iters: int, peak_lr: float, stage: str,
          device: str, dtype: torch.dtype, log: list[dict]) -> torch.optim.Optimizer:
    """Train `iters` optimizer steps with per-role loss `weights`. Both stages run through here.

    The loss of a step is sum(weight x token loss) / sum(weight), both sums over all micro-batches
    of the step, so every supervised token counts the same however the batch is cut.
    """
    device_type = device.split(":")[0]
    optimizer = model.configure_optimizer(peak_lr, cfg.weight_decay, (0.9, 0.95), device_type)
    step_model = torch.compile(model) if cfg.compile else model
    batches = D.Batches(train_set, cfg.batch_size, cfg.seed)
    start = time.time()
    tokens = 0
    for step in range(iters):
        lr = lr_at(step, iters, peak_lr, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [batches.get(step * cfg.grad_accum + i, device) for i in range(cfg.grad_accum)]
        micro_weights = [sftkey.token_weights(roles, weights) for _, _, roles in micro]
        total_weight = sum(w.sum() for w in micro_weights).clamp(min=1e-8)  # all-zero step: zero loss
        step_loss = 0.0
        model.train()
        for (x, y, _), w in zip(micro, micro_weights):
            with autocast(device, dtype):
                hidden = step_model(x)
                loss = sftkey.weighted_loss_sum(hidden, model.lm_head, y, w) / total_weight
            loss.backward()
            step_loss += loss.detach()
            tokens += x.numel()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        last = step == iters - 1
        if step % cfg.log_interval == 0 or last:
            elapsed = time.time() - start
            eta = elapsed / (step + 1) * (iters - step - 1)
            step_loss = float(step_loss)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"{stage} step {step}: the loss is {step_loss}; stopping")
            print(f"{stage} step {step:5d}/{iters} | lr {lr:.2e} | loss {step_loss:.4f} | "
                  f"{tokens / elapsed:,.0f} tok/s | {_clock(elapsed)} elapsed | ETA {_clock(eta)}", flush=True)
            log.append({"stage": stage, "step": step, "lr": lr, "loss": step_loss, "tokens_per_s": tokens / elapsed})
        if step % cfg.eval_interval == 0 or last:
            val = validation_loss(model, val_set, cfg, device, dtype)
            print(f"{stage} step {step:5d} | val loss: thinking {val['thinking']:.4f} | key {val['key']:.4f}",
                  flush=True)
            log.append({"stage": stage, "step": step, **{f"val_{k}": v for k, v in val.items()}})
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
        for role in (sftkey.THINK, sftkey.KEY):
            onehot = tuple(float(r == role) for r in range(3))
            w = sftkey.token_weights(roles, onehot)
            with autocast(device, dtype):
                sums[role] += sftkey.weighted_loss_sum(model(x), model.lm_head, y, w)
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
            outs = model.generate([prompts[i] for i in rows], cfg.block_size, enc.eot_token)
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
        flag, help_text = f"--{f.name}", f.metadata["help"] + f" (default: {f.default!r})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def run(cfg: TrainConfig) -> dict:
    """Stage 1 (or a single stage), evaluation, then stage 2 and evaluation when stage2_iters > 0."""
    torch.manual_seed(cfg.seed)
    device, dtype = resolve_device(cfg)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    enc = D.get_encoding(cfg.encoding)
    train_set, val_set, test = load_data(cfg, enc)
    for s in (train_set.summary, val_set.summary):
        print(D.format_summary(s))
    model = build_model(cfg, enc, device)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers, {cfg.n_embd} wide | "
          f"device {device} | {str(dtype).replace('torch.', '')}")

    first = "key_tag" if cfg.key_only else "sft_tag"
    if cfg.untagged:
        first = "sft"
    stages = [] if cfg.eval_only else [(first, sftkey.role_weights(cfg.key_only, cfg.key_weight), cfg.max_iters, cfg.lr)]
    if cfg.stage2_iters > 0 and not cfg.eval_only:
        stages.append(("sftkey_tag", sftkey.role_weights(key_only=True), cfg.stage2_iters, cfg.stage2_lr or cfg.lr))
    results, log, timing = {}, [], {}
    if cfg.eval_only:
        results["init"] = evaluate(model, enc, test, cfg, device, dtype)
    for name, weights, iters, lr in stages:
        t0 = time.time()
        optimizer = train(model, train_set, val_set, cfg, weights, iters, lr, name, device, dtype, log)
        timing[name] = time.time() - t0
        save_checkpoint(os.path.join(cfg.out_dir, name, "ckpt.pt"), model, optimizer, cfg, iters)
        results[name] = evaluate(model, enc, test, cfg, device, dtype)
        r = results[name]
        print(f"{name}: Acc {_fmt(r['acc'])} | Fmt {_fmt(r['fmt'])} | Composite {_fmt(r['composite'])} "
              f"on {r['n']} test examples | trained in {_clock(timing[name])}", flush=True)
        for sample in r["samples"][:1]:
            print(f"  e.g. {sample['prompt']!r} -> {sample['response']!r} (reference {sample['reference']!r})")
    table = results_table(results)
    print(table)
    summary = {"config": dataclasses.asdict(cfg), "data": [train_set.summary, val_set.summary],
               "results": results, "train_seconds": timing, "log": log}
    write_json(os.path.join(cfg.out_dir, "results.json"), summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        run(cfg)
    except (FileNotFoundError, ValueError) as err:  # bad input or flags: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
