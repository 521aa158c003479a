"""Speed measurements, side by side in one run on the current machine: `python bench.py`.

Measures, and prints as Markdown tables (docs/performance.md is this output):
  1. the training step at GPT-2's vocabulary on GSM8K-shaped batches, projecting every position onto
     the vocabulary (the plain way, written below) vs only the supervised ones (sftkey.py), with a
     stage-1 (SFT-Tag) and a stage-2 (Key) mask: tokens/s, step memory, MFU;
  2. greedy generation of 200 new tokens re-running the whole prefix for every token vs with the
     KV cache, one prompt and a batch of prompts;
  3. the padding share of the batches data.Batches makes on GSM8K train;
  4. float32 vs bfloat16 autocast, at the bench model and at train.py's default model.
`--json PATH` writes the same figures; `--quick` shrinks everything to a smoke test. It reads
GSM8K from ../shared/gsm8k when present (else --data, else GSM8K-shaped synthetic text) and runs
unchanged on CUDA. Timings are medians of timed iterations after warm-up ones, the configurations
being compared taking turns so that a shared machine's changing load falls on all of them alike.
"""
from __future__ import annotations

if __name__ == "__main__":
    import startup  # noqa: F401  (first, before torch loads: a stop signal now ends in one line)

import argparse
import math
import os
import statistics
import time
import weakref
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_HERE = os.path.dirname(os.path.abspath(__file__))
_SHARED = os.path.join(_HERE, "..", "shared")
if os.path.isdir(os.path.join(_SHARED, "tiktoken_cache")):  # offline copies of GPT-2's BPE files
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(_SHARED, "tiktoken_cache"))

import checkpoints as ckpts  # noqa: E402  (after TIKTOKEN_CACHE_DIR is set)
import data as D  # noqa: E402
import runtime as R  # noqa: E402
import sftkey  # noqa: E402
import train as T  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

DEFAULT_DATA = os.path.join(_SHARED, "gsm8k", "train.jsonl")


def full_projection_loss_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                             weights: torch.Tensor) -> torch.Tensor:
    """The plain way, the baseline: project every position onto the vocabulary, weight the losses after.

    Same value as sftkey.weighted_loss_sum (tests/test_perf.py checks it), but the (B, T, vocab)
    logits, their float copy and their gradient are all materialised whatever the mask.
    """
    logits = head(hidden)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * weights.flatten()).sum()


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the `with` block and alive at the same time.

    The CPU has no allocator statistics like torch.cuda.max_memory_allocated, and process RSS
    hides frees behind the C allocator, so this counts every new storage an operator returns
    (activations, logits, gradients) and subtracts it when the storage is freed. Tensors that
    existed before (weights, optimizer state) are not counted, nor are views of them.
    """

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in seen or key in self._live:  # a view or an in-place result: nothing new
                continue
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


# ---------------------------------------------------------------------------------------------
# Data

def gsm8k_shaped(n: int, seed: int) -> list[D.Example]:
    """Synthetic examples of GSM8K's shape (about 56 prompt, 99 reasoning and 3 answer tokens with
    gpt2), for machines without the real data: only the lengths matter to the timings."""
    rng = np.random.default_rng(seed)
    words = ("the", "she", "has", "apples", "each", "day", "more", "than", "how", "many", "does", "he",
             "buy", "total", "cost", "dollars", "if", "and", "of", "per", "week", "sells", "left", "so")

    def text(mean: float) -> str:
        count = max(8, int(rng.normal(mean, mean / 3)))
        return " ".join(str(rng.integers(2, 100)) if rng.random() < 0.15 else words[rng.integers(len(words))]
                        for _ in range(count))

    return [D.Example(text(45) + "?", text(80) + ".", str(rng.integers(1, 1000))) for _ in range(n)]


def load_examples(path: str, limit: int, seed: int) -> tuple[list[D.Example], str]:
    if path and (path != DEFAULT_DATA or os.path.isfile(path)):  # one given is read, or its problem named
        examples = D.read_examples(path, "gsm8k", raw=D.read_input(path, "--data"))
        return examples[:limit] if limit else examples, os.path.relpath(path)
    return gsm8k_shaped(limit or 7473, seed), "GSM8K-shaped synthetic text (no GSM8K file found)"


def median_batch(data: D.TokenizedSet, batch_size: int) -> list[int]:
    """`batch_size` examples of about the median length: a typical length-grouped batch."""
    order = np.argsort([len(ids) for ids in data.ids], kind="stable")
    start = max(0, len(order) // 2 - batch_size // 2)
    return order[start:start + batch_size].tolist()


def padding_share(data: D.TokenizedSet, batch_size: int, window: int, seed: int) -> float:
    """Padded positions / computed positions over one epoch of data.Batches."""
    batches = D.Batches(data, batch_size, seed, window=window)
    real = computed = 0
    for i in range(batches.per_epoch):
        lengths = np.array([len(data.ids[j]) - 1 for j in batches.indices(i)])  # inputs drop the last token
        real, computed = real + lengths.sum(), computed + lengths.max() * len(lengths)
    return float(1 - real / computed)


# ---------------------------------------------------------------------------------------------
# Timing

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def interleaved_seconds(fns: dict[str, Callable[[], object]], device: str, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each function. The functions take turns, call by call, so that a
    change in the load of a shared machine falls on all of them alike rather than on one."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(iters):
        for key, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def step_memory(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated by one call of `fn` on top of what was allocated before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - before
    with PeakMemory() as tracker:
        fn()
    return tracker.peak


def train_step(model: GPT, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...], w: torch.Tensor,
               full: bool, device: str, dtype: torch.dtype) -> Callable[[], None]:
    """One training step (forward, loss, backward, AdamW update) with either projection."""
    x, y, _ = batch
    loss_sum = full_projection_loss_sum if full else sftkey.weighted_loss_sum

    def step() -> None:
        with R.autocast(device, dtype):
            loss = loss_sum(model(x), model.lm_head, y, w) / w.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def generation(model: GPT, prompts: list[list[int]], new_tokens: int, use_cache: bool, device: str,
               dtype: torch.dtype, allowed: torch.Tensor) -> Callable[[], None]:
    """Greedy generation of exactly `new_tokens` per prompt (the stop token -1 is never produced) among the
    `allowed` ids (`data.generable_ids`)."""
    def generate() -> None:
        with R.autocast(device, dtype):
            out = model.generate(prompts, new_tokens, stop_token=-1, use_cache=use_cache, allowed=allowed)
        if any(len(row) != new_tokens for row in out):
            raise RuntimeError("generation stopped early; the timing would not be comparable")
    return generate


# ---------------------------------------------------------------------------------------------
# The run

def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def mfu_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def run(args) -> dict:
    started = time.time()
    examples, source = load_examples(args.data, args.limit, args.seed)  # bad input: refused before any setting
    enc = D.get_encoding("gpt2")
    data = D.tokenize(examples, enc, args.block_size, name=source)
    by_prompt = sorted(range(len(data.examples)), key=lambda i: len(data.examples[i].prompt))
    prompts = [enc.encode_ordinary(sftkey.prompt_head(data.examples[i].prompt))
               for i in by_prompt[len(by_prompt) // 2:][:args.gen_batch]]  # of about the median length
    if (longest := max(map(len, prompts))) + args.new_tokens > args.block_size + 1:  # generation would stop early
        raise ValueError(f"--new_tokens {args.new_tokens}: prompts of up to {longest} tokens leave room for "
                         f"{args.block_size + 1 - longest} in --block_size {args.block_size}")
    torch.set_num_threads(args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                           else os.cpu_count()))
    _, device, dtype = R.set_up_device(T.TrainConfig(device=args.device, dtype=args.dtype, n_embd=args.n_embd,
                                                     seed=args.seed))  # the seed, and TF32 on CUDA as train.py has
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    # Emulated bf16 (a CPU without AVX-512 BF16, a GPU before Ampere) is hundreds of times slower:
    # timing it would take hours and say nothing about the method, so it is only timed when native.
    bf16_ok = R.native_bf16(device) or dtype == torch.bfloat16 or args.emulated_bf16
    out: dict = {"device": device, "device_name": R.device_name(device), "dtype": dtype_name(dtype),
                 "threads": torch.get_num_threads()}
    tables = []

    config = GPTConfig(64 * math.ceil(enc.n_vocab / 64), args.block_size, args.n_layer, args.n_head, args.n_embd)
    model = GPT(config).to(device)
    optimizer = model.configure_optimizer(1e-4, 0.1, (0.9, 0.95), device.split(":")[0])
    dtypes = (dtype, other) if bf16_ok else (dtype,)
    peaks = {d: R.peak_flops(device, d) for d in dtypes}  # a known GPU's data sheet, else None: no MFU

    # 1. the training step (and 4. its other dtype), all configurations taking turns
    rows = median_batch(data, args.batch_size)
    batch = D.collate([data.ids[i] for i in rows], [data.roles[i] for i in rows], device)
    x, _, roles = batch
    masks = {"stage 1": sftkey.token_weights(roles, sftkey.role_weights()),
             "stage 2": sftkey.token_weights(roles, sftkey.role_weights(key_only=True))}
    configs = {"full": ("stage 1", True, dtype), "sft": ("stage 1", False, dtype), "key": ("stage 2", False, dtype)}
    if bf16_ok:
        configs["sft_" + dtype_name(other)] = ("stage 1", False, other)
    steps = {k: train_step(model, optimizer, batch, masks[m], full, device, d) for k, (m, full, d) in configs.items()}
    seconds = interleaved_seconds(steps, device, args.warmup, args.iters)
    real = int((roles != sftkey.PAD).sum())
    runs = {}
    for key, (mask, full, d) in configs.items():
        projected = (x.numel() if full else int((masks[mask] != 0).sum())) / real
        rate = real / seconds[key]
        runs[key] = {"tokens_per_s": rate, "step_ms": 1000 * seconds[key], "dtype": dtype_name(d),
                     "memory_mb": step_memory(steps[key], device) / 2 ** 20, "projected_fraction": projected,
                     "flops_per_s": R.mfu(model, rate, x.size(1), projected, 1.0)}
    for key, r in runs.items():
        peak = peaks[configs[key][2]]
        r["mfu"] = r["flops_per_s"] / peak if peak else None
    base = runs["full"]["tokens_per_s"]
    labels = {"full": ("every position (plain)", "any"), "sft": ("supervised only", "stage 1 (SFT-Tag)"),
              "key": ("supervised only", "stage 2 (Key)")}
    tables.append((f"Training step: {args.n_layer} layers x {args.n_embd}, vocabulary {config.vocab_size}, "
                   f"batch {x.size(0)} x {x.size(1)} tokens, {dtype_name(dtype)}, {device}",
                   _table(["projected onto the vocabulary", "mask", "share projected", "tokens/s", "step ms",
                           "step memory MB", "MFU", "speedup"],
                          [[*labels[k], f"{runs[k]['projected_fraction']:.0%}", f"{runs[k]['tokens_per_s']:,.0f}",
                            f"{runs[k]['step_ms']:,.0f}", f"{runs[k]['memory_mb']:,.0f}", mfu_text(runs[k]['mfu']),
                            f"{runs[k]['tokens_per_s'] / base:.2f}x"] for k in labels])))
    out["train_step"] = runs
    out["sft_step_speedup"] = runs["sft"]["tokens_per_s"] / base
    out["key_step_speedup"] = runs["key"]["tokens_per_s"] / base
    out["mfu"] = runs["sft"]["mfu"]
    out["peak_flops"] = {dtype_name(d): p for d, p in peaks.items()}

    # 2. generation: prompts of about the median length (`prompts`, above), each method taking turns
    model.eval()
    groups = {"single": prompts[:1], "batched": prompts}
    allowed = D.generable_ids(enc, config.vocab_size).to(device)
    for group in groups.values():
        for use_cache in (False, True):  # warm-up: a few tokens only
            generation(model, group, 4, use_cache, device, dtype, allowed)()
    gens = {(g, c): generation(model, group, args.new_tokens, c, device, dtype, allowed)
            for g, group in groups.items() for c in (False, True)}
    seconds = interleaved_seconds(gens, device, 0, args.gen_iters)
    model.train()
    gen, gen_rows = {}, []
    for g, group in groups.items():
        rates = [len(group) * args.new_tokens / seconds[(g, c)] for c in (False, True)]
        gen.update({f"{g}_no_cache_tokens_per_s": rates[0], f"{g}_kv_cache_tokens_per_s": rates[1],
                    f"kv_cache_speedup_{g}": rates[1] / rates[0]})
        gen_rows += [[len(group), "re-run the whole prefix", f"{rates[0]:,.1f}", "1.00x"],
                     [len(group), "KV cache", f"{rates[1]:,.1f}", f"{rates[1] / rates[0]:.2f}x"]]
    tables.append((f"Greedy generation: {args.new_tokens} new tokens per prompt, prompts of "
                   f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {dtype_name(dtype)}",
                   _table(["prompts", "method", "tokens/s", "speedup"], gen_rows)))
    out["generation"] = gen
    out["kv_cache_speedup"] = gen["kv_cache_speedup_batched"]  # evaluation generates in batches

    # 3. padding, at the bench's batch size and train.py's default one
    window = D.Batches(data, 1, 0).window  # the loader's default
    windows = sorted({1, window, 64})
    padding, pad_rows = {}, []
    for size in sorted({args.batch_size, T.TrainConfig().batch_size}):
        padding[size] = {w: padding_share(data, size, w, args.seed) for w in windows}
        pad_rows.append([size, *(f"{padding[size][w]:.1%}" for w in windows)])
    heads = [f"window {w}" + (" (no grouping)" if w == 1 else " (default)" if w == window else "") for w in windows]
    tables.append((f"Padding: padded / computed positions over one epoch of data.Batches on {source} "
                   f"({len(data.ids)} examples, gpt2); window = batches sorted by length together",
                   _table(["batch size", *heads], pad_rows)))
    out["padding"] = {str(s): {str(w): v for w, v in p.items()} for s, p in padding.items()}
    out["padding_fraction"] = max(p[window] for p in padding.values())  # the worse of the two batch sizes

    # 4. precision: the stage-1 (supervised-only) step at both dtypes
    if bf16_ok:
        pair = {d: runs["sft" if d == dtype else "sft_" + dtype_name(other)]["tokens_per_s"] for d in dtypes}
        small = default_model_rates(device, args)
        out["bf16_speedup"] = pair[torch.bfloat16] / pair[torch.float32]
        out["bf16_speedup_default_model"] = small["bfloat16"] / small["float32"]
        out["precision"] = {"bench_model": {dtype_name(d): r for d, r in pair.items()}, "default_model": small}
        dflt = T.TrainConfig()
        tables.append(("Precision: stage-1 training step, float32 vs bfloat16 autocast",
                       _table(["model", "float32 tokens/s", "bfloat16 tokens/s", "bf16 speedup"],
                              [[f"bench ({args.n_layer} x {args.n_embd}, gpt2 vocabulary)",
                                f"{pair[torch.float32]:,.0f}", f"{pair[torch.bfloat16]:,.0f}",
                                f"{out['bf16_speedup']:.2f}x"],
                               [f"train.py default ({dflt.n_layer} x {dflt.n_embd}, synthetic task, batch "
                                f"{dflt.batch_size})", f"{small['float32']:,.0f}", f"{small['bfloat16']:,.0f}",
                                f"{out['bf16_speedup_default_model']:.2f}x"]])))
    else:
        out["bf16_speedup"] = out["bf16_speedup_default_model"] = None
        tables.append(("Precision", f"bfloat16 not timed: {out['device_name']} has no native bfloat16 matrix product."))
    out["seconds"] = time.time() - started
    out["tables"] = [f"{title}\n\n{table}" for title, table in tables]
    return out


def default_model_rates(device: str, args) -> dict[str, float]:
    """Stage-1 step tokens/s of train.py's default model on its synthetic task, at both dtypes."""
    cfg = T.TrainConfig()
    enc = D.get_encoding(cfg.encoding)
    data = D.tokenize(D.synthetic_task(2 * cfg.batch_size, cfg.seed), enc, cfg.block_size, name="synthetic")
    batch = D.Batches(data, cfg.batch_size, cfg.seed).get(0, device)
    model = GPT(ckpts.model_config(cfg, enc)).to(device)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, 0.95), device.split(":")[0])
    w = sftkey.token_weights(batch[2], sftkey.role_weights())
    steps = {dtype_name(d): train_step(model, optimizer, batch, w, False, device, d)
             for d in (torch.float32, torch.bfloat16)}
    seconds = interleaved_seconds(steps, device, args.warmup, args.small_iters)
    return {key: int((batch[2] != sftkey.PAD).sum()) / s for key, s in seconds.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds (for tests)")
    p.add_argument("--data", default=DEFAULT_DATA, help="GSM8K-format JSONL (default: ../shared/gsm8k/train.jsonl; "
                                                        "synthetic GSM8K-shaped text when absent)")
    p.add_argument("--limit", type=int, default=0, help="use the first N examples only (0 = all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (as train.py)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 (as train.py)")
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_head", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=384)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8, help="sequences per training step")
    p.add_argument("--gen_batch", type=int, default=8, help="prompts in the batched generation")
    p.add_argument("--new_tokens", type=int, default=200,
                   help="tokens generated per prompt (they must fit in --block_size after the prompt)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations before timing")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (the median is reported)")
    p.add_argument("--small_iters", type=int, default=20, help="timed iterations for train.py's default model")
    p.add_argument("--gen_iters", type=int, default=1, help="timed generations per method (the median is reported)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0 = every core this process may use; at most the machine's CPUs)")
    p.add_argument("--emulated_bf16", action="store_true", help="time bfloat16 even where the device only "
                   "emulates it (a CPU without AVX-512 BF16: very slow at the default sizes; for tests with --quick)")
    p.add_argument("--seed", type=int, default=1337)
    return p


QUICK = dict(limit=300, n_layer=1, n_head=2, n_embd=32, batch_size=2, gen_batch=2, new_tokens=8, warmup=1,
             iters=1, small_iters=1)


def check_args(args) -> None:
    """Every flag's rule, all problems in one ValueError (as train.py's flags): not a traceback from deep inside."""
    problems = [f"--{k} {getattr(args, k)}: must be a whole number >= {low}" for low, names in (
        (1, "n_layer n_head n_embd block_size batch_size gen_batch new_tokens iters small_iters gen_iters"),
        (0, "warmup threads limit seed")) for k in names.split() if getattr(args, k) < low]
    if args.n_head >= 1 and args.n_embd % args.n_head:
        problems.append(f"--n_embd {args.n_embd}: must be a multiple of --n_head {args.n_head}")
    if args.dtype not in ("auto", "float32", "bfloat16"):
        problems.append(f"--dtype {args.dtype}: use auto, float32 or bfloat16")
    if args.device != "auto" and (problem := R.device_problem(args.device)):
        problems.append(problem)
    if args.json and os.path.lexists(args.json) and not (os.path.isfile(args.json) or os.path.islink(args.json)):
        problems.append(f"--json {args.json}: a folder or a device; give a file (checked before the run, not after it)")
    if args.threads > (os.cpu_count() or 1):  # thousands made OpenMP fail, hang or crash (a segfault at 100,000)
        problems.append(f"--threads {args.threads}: more than this machine's {os.cpu_count()} CPUs")
    if problems:
        raise ValueError("; ".join(problems))


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)  # explicit flags still win over --quick
    out = {}

    def work() -> None:  # bad input: one line, exit 2; a failed --json write: one line, exit 1
        check_args(args)
        out.update(run(args))
        print(f"bench.py on {out['device']} ({out['device_name']}, {out['threads']} threads), {out['seconds']:.0f} s\n")
        print("\n\n".join(out["tables"]))
        print(f"\nkey_step_speedup {out['key_step_speedup']:.2f} | sft_step_speedup {out['sft_step_speedup']:.2f} | "
              f"kv_cache_speedup {out['kv_cache_speedup']:.1f} | padding_fraction {out['padding_fraction']:.3f} | "
              f"bf16_speedup {out['bf16_speedup'] or float('nan'):.2f} | mfu {R.number(out['mfu'])}")
        if args.json:
            ckpts.write_json(args.json, out)
    with R.StopSignal("--json is whole or not written"):  # Ctrl-C, SIGTERM, SIGHUP: one line, exit 130, no temporary
        R.command(work)
    return out


if __name__ == "__main__":
    main()
