"""Check and measure a GPU in one command, offline (on one H200 the sections took over 10 minutes in all):

    python scripts/gpu_check.py --gsm8k DIR --tiktoken_cache DIR [--out out/gpu_check]

Sections (--sections picks some and their order; each has a time limit, and a failed one does not stop the rest):
1. profile: first where two steps of train.train make the host wait for the GPU (file:line, from
   CUDA's sync debug mode); then stage-1 and stage-2 steps at GPT-2 small's shape on the same batches,
   eager and compiled, at micro-batches of 16, 64 and 128: step time, tokens/s, MFU, the stage-2
   speedup, and a torch.profiler table of stage-1 steps (OUT/profile.txt);
2. tests: the CUDA tests (pytest tests/test_cuda.py);
3. recipe: the README's GPT-2-small recipe at GPT-2 small's shape (12 x 768, gpt2 vocabulary, random
   weights: no hub is needed), both stages (--stage1_iters / --stage2_iters steps), bf16 autocast,
   once eager and once with --compile. For each stage: steps, wall time (compilation and
   validation included), tokens/s over the whole stage and over its second half (compilation and
   warm-up left out), MFU, peak GPU memory. The eager run then greedily answers the first
   --eval_problems test problems and says how long that took (the compiled run scores one problem),
   and answers them again with the KV cache off (time, tokens/s, rows identical to the cached run);
4. bench: bench.py's tables on GSM8K train at GPT-2 small's shape (12 x 768, batch 32);
5. default, experiment: `python train.py` and `python experiment.py` as they are, on --device.

DIR holds GSM8K's train.jsonl and test.jsonl; the tiktoken cache folder holds GPT-2's BPE files
(TIKTOKEN_CACHE_DIR). `--quick --device cpu` is the smoke version the test suite runs
(tests/test_gpu_check.py): a 1-layer model, a few steps, a few problems. Everything printed also
goes to OUT/gpu_check.json. The exit status is 1 when a section failed; the others still run.

Each section runs in a process of its own (recipe and profile: this script with --worker), its output
going to OUT/SECTION.log and to stdout as it comes. --budget_s is hard: a section gets at most what is
left of it (or its own limit, `--sections profile:200`), is killed there ("stopped at budget", what it
measured kept), and none starts once it is spent ("skipped: budget spent"); neither counts as a failure.
gpu_check.json is rewritten after each section and each recipe stage, evaluation and profile setting, and
on SIGTERM (an outer `timeout`; the exit status is then 143). The runs' checkpoints (about 1.5 GB each) go
to --work_dir, not to OUT; their small files (results.json, logs) are copied to OUT/SECTION/.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# GPT-2 small on GSM8K as the README's recipe has it, from random weights (hence a from-scratch lr). No validation
# answers: four greedy passes over 100 prompts (about 15 s of device time) would score a model that knows nothing yet.
RECIPE = ["--format", "gsm8k", "--encoding", "gpt2", "--block_size", "512", "--n_layer", "12", "--n_head", "12",
          "--n_embd", "768", "--batch_size", "16", "--grad_accum", "2", "--lr", "3e-4", "--warmup_iters", "30",
          "--log_interval", "25", "--eval_interval", "1000", "--eval_batch_size", "100", "--dtype", "bfloat16",
          "--val_acc_n", "0"]
# The default order puts first what answers the open questions (MFU, the stage-2 speedup, host waits): a check cut
# short by its budget loses the end. Each section's time limit unless --sections gives one; --budget_s cuts them all.
SECTIONS = ("profile", "tests", "recipe", "bench", "default", "experiment")
LIMITS = {"profile": math.inf, "tests": 300, "recipe": math.inf, "bench": 300, "default": 900, "experiment": 1800}
# bench.py at the recipe's model shape, more timed iterations than its CPU default (a GPU step is short)
BENCH = ["--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--batch_size", "32", "--gen_batch", "64",
         "--warmup", "3", "--iters", "10"]
# train.py and experiment.py at tiny sizes for the CPU smoke test (--quick)
QUICK_RUN = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--n_train", "200", "--n_val", "20", "--n_test", "8",
             "--warmup_iters", "1", "--log_interval", "1"]
QUICK = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "4", "--grad_accum", "1",
         "--warmup_iters", "1", "--log_interval", "1", "--eval_batch_size", "4", "--dtype", "float32",
         "--block_size", "256", "--n_val", "8"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gsm8k", required=True, help="folder with GSM8K's train.jsonl and test.jsonl")
    p.add_argument("--tiktoken_cache", required=True, help="folder with tiktoken's cached GPT-2 files")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "gpu_check"), help="logs, gpu_check.json, the runs' "
                   "small files (no checkpoints): the folder to bring back")
    p.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "gpu_check"),
                   help="the runs' folders, checkpoints included (about 1.5 GB each at GPT-2 small)")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the smoke version)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps: a smoke test of this script")
    p.add_argument("--sections", default=",".join(SECTIONS), type=parse_sections,
                   help=f"comma-separated subset of {','.join(SECTIONS)}, run in the order given; NAME:SECONDS "
                   "gives a section its own time limit (e.g. profile:200,tests:100,recipe)")
    p.add_argument("--stage1_iters", type=int, default=300)
    p.add_argument("--stage2_iters", type=int, default=200)
    p.add_argument("--eval_problems", type=int, default=200, help="test problems the eager run answers")
    p.add_argument("--limit", type=int, default=0, help="use the first N training problems only (0 = all)")
    p.add_argument("--recipe_runs", default="eager,compile", help="recipe: eager and/or compile (cold compilation "
                   "takes minutes)")
    p.add_argument("--profile_batches", default="16,64,128", help="profile: micro-batch sizes (comma-separated)")
    p.add_argument("--profile_modes", default="eager,compiled", help="profile: eager and/or compiled")
    p.add_argument("--profile_backends", default="default", help="profile: attention backends of "
                   "scaled_dot_product_attention: default (PyTorch's choice), flash, efficient, cudnn, math")
    p.add_argument("--budget_s", type=float, default=0, help="seconds for the whole check (0 = no limit): each "
                   "section is stopped when it is spent, what it measured kept, and no section starts after, so a "
                   "check under an outer limit (e.g. 400 under 420) ends by itself, its JSON complete")
    p.add_argument("--compile_backend", default="", help="torch.compile backend (default inductor; the CPU smoke "
                                                         "test uses eager, inductor's C++ build taking minutes)")
    p.add_argument("--worker", choices=("recipe", "profile"), help=argparse.SUPPRESS)  # one section, in this process
    return p


def parse_sections(text: str) -> list[tuple[str, float]]:
    """`profile:200,tests` -> [("profile", 200.0), ("tests", 300)]: each section with its time limit, in order."""
    plan = []
    for item in text.split(","):
        name, _, seconds = item.partition(":")
        if name not in SECTIONS:
            raise argparse.ArgumentTypeError(f"{name!r} is not one of {','.join(SECTIONS)}")
        plan.append((name, float(seconds) if seconds else LIMITS[name]))
    return plan


class Terminated(Exception):
    """SIGTERM (an outer `timeout`): the check stops its section, writes what it has and ends."""


def _terminate(signum, frame):
    # `timeout` signals its command and then its process group, this process twice: the first ends the check,
    # a second must not break off the bookkeeping that the first started
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def run_section(name: str, command: list[str], timeout: float, report: dict, log_dir: str | None = None) -> None:
    """A subprocess whose status and time go into `report`. Its output goes line by line, flushed, to
    LOG_DIR/NAME.log and to stdout (a check killed from outside keeps what it printed). At `timeout`
    seconds, or on SIGTERM, its process group is killed and the section marked "stopped"."""
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    start, tail, stopped = time.time(), collections.deque(maxlen=200), None
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    log = open(os.path.join(log_dir, f"{name}.log"), "w") if log_dir else open(os.devnull, "w")
    # a session of its own: the kill reaches the section's children too (pytest's torchrun, say), and an
    # outer `timeout`'s SIGTERM reaches this process only, which then ends the section itself
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def copy() -> None:
        for line in proc.stdout:
            for stream in (log, sys.stdout):
                stream.write(line)
                stream.flush()
            tail.append(line)
    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=None if math.isinf(timeout) else max(timeout, 0))
    except subprocess.TimeoutExpired:
        stopped = f"stopped at budget ({timeout:.0f} s)"
    except Terminated:
        stopped = "stopped by SIGTERM"
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):  # the section's leftovers, or all of it when stopped
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=5)
        log.close()
        output = "".join(tail)
        report[name] = {"status": proc.returncode, "seconds": time.time() - start, "output_tail": output[-3000:]}
        if stopped:
            report[name]["stopped"] = stopped
            print(f"{name}: {stopped}", flush=True)


def time_left(args) -> float:
    """Seconds left of --budget_s (inf without one)."""
    return getattr(args, "deadline", math.inf) - time.time()


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: str) -> float | None:
    """The peak GPU memory allocated since the last reset_peak_memory (None on a CPU)."""
    if not device.startswith("cuda"):
        return None
    import torch
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


class StageProbe:
    """Wraps train.train, train.evaluate and Meter.line to time each stage, its steady second half,
    its peak GPU memory and the evaluation, without touching the project's code. `save` is called after
    each stage and evaluation (a run stopped at the budget keeps them)."""

    def __init__(self, train_module, runtime_module, torch_module, device: str, save=lambda: None):
        self.T, self.R, self.torch, self.device, self.save = train_module, runtime_module, torch_module, device, save
        self.stages: dict[str, dict] = {}
        self.evals: list[dict] = []
        self._marks: list[tuple[int, float, float]] = []  # (step, busy seconds, real tokens) at each log line
        self._stage, self._last = "", {}

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize(self.device)

    def __enter__(self) -> StageProbe:
        self._train, self._evaluate, self._line = self.T.train, self.T.evaluate, self.R.Meter.line
        probe = self

        def train(*args, **kwargs):
            bound = inspect.signature(probe._train).bind(*args, **kwargs)
            stage, iters = bound.arguments["stage"].name, bound.arguments["stage"].iters
            probe._sync()
            reset_peak_memory(probe.device)
            probe._marks, probe._stage, start = [], stage, time.time()
            probe._training = True  # evaluate calls inside training are validation answers, not test evaluations
            optimizer = probe._train(*args, **kwargs)
            probe._training = False
            probe._sync()
            row = {"steps": iters, "seconds": time.time() - start}
            if probe.device.startswith("cuda"):
                row["peak_memory_gb"] = peak_memory_gb(probe.device)
            row.update(probe._rates(iters))
            probe.stages[stage] = row
            probe.save()
            return optimizer

        def line(meter, stage, step, lr, step_loss):
            out = probe._line(meter, stage, step, lr, step_loss)
            busy = time.time() - meter.start - meter.paused_seconds
            probe._marks.append((step, busy, out["tokens_per_s"] * busy))
            probe._last = out
            return out

        def evaluate(model, enc, examples, *args, **kwargs):
            if getattr(probe, "_training", False):
                return probe._evaluate(model, enc, examples, *args, **kwargs)
            probe._sync()
            start = time.time()
            result = probe._evaluate(model, enc, examples, *args, **kwargs)
            probe._sync()
            probe.evals.append({"after": probe._stage, "problems": len(examples), "seconds": time.time() - start, "acc": result["acc"],
                                "fmt": result["fmt"]})
            probe.save()
            return result

        self.T.train, self.T.evaluate, self.R.Meter.line = train, evaluate, line
        return self

    def _rates(self, iters: int) -> dict:
        last = self._last
        rates = {"tokens_per_s": last["tokens_per_s"], "mfu": last.get("mfu")}
        half = [m for m in self._marks if m[0] >= iters // 2]
        if len(half) >= 2 and half[-1][1] > half[0][1]:  # tokens/s between the first and last log lines of it
            rates["steady_tokens_per_s"] = (half[-1][2] - half[0][2]) / (half[-1][1] - half[0][1])
        return rates

    def __exit__(self, *exc) -> None:
        self.T.train, self.T.evaluate, self.R.Meter.line = self._train, self._evaluate, self._line


def recipe(args, report: dict) -> bool:
    """The GPT-2-small recipe, eager then compiled (--recipe_runs), in this process. Returns whether all ran."""
    import torch

    import runtime
    import train
    work = os.path.join(args.work_dir, "recipe")
    os.makedirs(work, exist_ok=True)
    data, test = (os.path.join(args.gsm8k, f"{split}.jsonl") for split in ("train", "test"))
    if args.limit:  # the first N lines only, in a file of their own
        data = os.path.join(args.work_dir, "train_head.jsonl")
        with open(os.path.join(args.gsm8k, "train.jsonl"), encoding="utf-8") as f, open(data, "w") as g:
            g.writelines(line for _, line in zip(range(args.limit), f))
    flags = [*RECIPE, *(QUICK if args.quick else []), "--data", data, "--eval_data", test, "--device", args.device,
             "--max_iters", str(args.stage1_iters), "--stage2_iters", str(args.stage2_iters),
             "--overwrite"]  # a rerun of the check replaces its own earlier runs
    report["recipe"] = {"flags": flags, "runs": {}}
    ok = True

    def save() -> None:
        save_report(args, report)
    for name in args.recipe_runs.split(","):
        extra = ["--eval_limit", str(args.eval_problems)] if name == "eager" else ["--compile", "--eval_limit", "1"]
        print(f"\n=== recipe, {name}: python train.py {' '.join(flags + extra)}", flush=True)
        start, run_dir = time.time(), os.path.join(work, name)
        probe = StageProbe(train, runtime, torch, args.device, save)
        run = report["recipe"]["runs"][name] = {"stages": probe.stages, "evaluations": probe.evals}  # filled as it goes
        try:
            with probe:
                train.run(train.parse_args([*flags, *extra, "--out_dir", run_dir]))
            run["seconds"] = time.time() - start
            save()
            if name == "eager":
                report["recipe"]["kv_cache"] = {}
                kv_cache_evaluation(args, [*flags, *extra], run_dir, report["recipe"]["kv_cache"], save)
        except Exception as err:  # report it and go on: the other run and the summary still count
            ok = False
            run.update(error=f"{type(err).__name__}: {err}", seconds=time.time() - start)
            print(f"recipe {name} failed: {type(err).__name__}: {err}", flush=True)
        save()
    return ok


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def kv_cache_evaluation(args, flags: list[str], run_dir: str, rows: dict, save) -> None:
    """train.evaluate on the run's final weights, with the KV cache (as always) and without it: a row each
    in `rows`, saved as it comes (the cache-off one may not finish), then their comparison."""
    import checkpoints as ckpts
    import data as D
    import runtime
    import train
    from model import GPT
    cfg = train.parse_args([*flags, "--init_from", os.path.join(run_dir, "sftkey_tag", "ckpt.pt"), "--out_dir", run_dir])
    enc = D.get_encoding(cfg.encoding)
    test = D.read_examples(cfg.eval_data, cfg.format)[:cfg.eval_limit]
    device, dtype = runtime.resolve_device(cfg)
    model = ckpts.build_model(cfg, enc, device)
    generate, outputs = GPT.generate, {}
    for use_cache in (True, False):
        produced: list[list[int]] = []

        def recording(self, prompts, *a, use_cache=use_cache, produced=produced, **k):
            out = generate(self, prompts, *a, **{**k, "use_cache": use_cache})
            produced.extend(out)
            return out
        GPT.generate = recording
        try:
            _sync(device)
            start = time.time()
            result = train.evaluate(model, enc, test, cfg, device, dtype)
            _sync(device)
        finally:
            GPT.generate = generate
        seconds, tokens = time.time() - start, sum(map(len, produced))
        rows["cache" if use_cache else "no_cache"] = {"problems": len(test), "seconds": seconds, "tokens": tokens,
                                                     "tokens_per_s": tokens / seconds, "acc": result["acc"]}
        outputs[use_cache] = produced
        save()
        print(f"evaluation, KV cache {'on' if use_cache else 'off'}: {len(test)} problems, {tokens} tokens "
              f"generated in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s)", flush=True)
    rows["identical_rows"] = sum(a == b for a, b in zip(outputs[True], outputs[False]))
    rows["speedup"] = rows["no_cache"]["seconds"] / rows["cache"]["seconds"]


def profile(args, report: dict) -> None:
    """The host waits of two train.train steps (host_waits), then stage-1 and stage-2 steps at the recipe's shape,
    eager and compiled, per attention backend.

    For each setting: a first pass of stage-1 steps over batches of widths it may not have met yet
    (per-shape set-up costs show there), then a second pass over the same batches with stage 1 and
    stage 2 taking turns (the steady step times, MFU from the FLOP formula, the stage-2 speedup),
    and a torch.profiler table of a few stage-1 steps, appended to OUT/profile.txt as it goes."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import checkpoints as ckpts
    import data as D
    import runtime
    import sftkey
    import train
    from model import GPT
    cfg = train.parse_args([*RECIPE, *(QUICK if args.quick else []), "--device", args.device])
    enc = D.get_encoding(cfg.encoding)
    cfg, device, dtype = runtime.set_up_device(cfg)
    examples = D.read_examples(os.path.join(args.gsm8k, "train.jsonl"), cfg.format)[:args.limit or None]
    data = D.tokenize(examples, enc, cfg.block_size, name="gsm8k train")
    model = GPT(ckpts.model_config(cfg, enc)).to(device)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, 0.95), device.split(":")[0])
    peak = runtime.peak_flops(device, dtype)
    warmup, timed = (1, 2) if args.quick else (3, 12)
    stages = {"stage 1": (0.0, 1.0, 1.0), "stage 2": (0.0, 0.0, 1.0)}
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    # mode first: every eager width (seconds each) before the compiled ones (a cold compilation each first)
    settings = [(b, m, k) for m in args.profile_modes.split(",") for b in map(int, args.profile_batches.split(","))
                for k in args.profile_backends.split(",")]
    rows: list[dict] = []
    report["profile"] = {"peak_flops": peak, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    table_path = os.path.join(args.out, "profile.txt")
    open(table_path, "w").close()
    # first: seconds, where the settings may run into the section's limit (a cold compilation alone took 60-90 s)
    val = D.tokenize(examples[:cfg.batch_size], enc, cfg.block_size, name="sync check")
    try:
        sites = host_waits(cfg, model, data, val, device, dtype)
    except Exception as err:  # a diagnosis, now first: its failure must not cost the settings after it
        sites = {"error": f"{type(err).__name__}: {err}"[:300]}
    model.train()  # its validation left the model in eval mode; the settings time training steps
    report["profile"]["host_waits"] = sites
    print("the host waits for the GPU in two steps of train.train (file:line: times; CUDA's sync debug mode): "
          + (", ".join(f"{k}: {v}" for k, v in sites.items()) or "nowhere"), flush=True)
    save_report(args, report)
    for n, (batch_size, mode, backend) in enumerate(settings):
        reset_peak_memory(device)  # each setting's own peak, not the largest of the process so far
        net = runtime.compiled(model, mode == "compiled")
        kernel = sdpa_kernel(backends[backend]) if backends[backend] is not None else None

        def step(i: int, weights: tuple[float, float, float]) -> tuple[float, int, int]:
            x, y, roles = batches.get(i, device)
            w = sftkey.token_weights(roles, weights)
            _sync(device)
            start = time.perf_counter()
            with runtime.autocast(device, dtype):
                loss = sftkey.weighted_loss_sum(net(x), model.lm_head, y, w) / w.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            return time.perf_counter() - start, x.numel(), int((w != 0).sum())
        name = f"batch {batch_size}, {mode}, attention {backend}"
        try:  # a setting that fails (too few examples for the batch, out of memory, ...) is a row: the rest go on
            batches = D.Batches(data, batch_size, cfg.seed)
            with kernel or contextlib.nullcontext():
                first = 1000 * (n + 1)  # batches no earlier setting used
                for i in range(warmup):
                    step(i, stages["stage 1"])
                fresh = [step(i, stages["stage 1"])[0] for i in range(first, first + timed)]
                totals = {stage: [0.0, 0, 0, 0.0] for stage in stages}  # seconds, positions, projected, FLOPs
                for i in range(first, first + timed):  # the same batches again, both stages taking turns
                    for stage, weights in stages.items():
                        seconds, positions, projected = step(i, weights)
                        t = totals[stage]
                        t[0], t[1], t[2] = t[0] + seconds, t[1] + positions, t[2] + projected
                        t[3] += model.flops_per_token(positions / batch_size, projected / positions) * positions
                table = profiler_table(step, first, device, name)
        except Exception as err:  # a backend this GPU or shape cannot run: say so, go on with the next
            print(f"{name}: failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", flush=True)
            rows.append({"batch_size": batch_size, "mode": mode, "backend": backend, "error": str(err)[:300]})
            save_report(args, report)
            continue
        for stage, (seconds, positions, projected, flops) in totals.items():
            rows.append({"batch_size": batch_size, "mode": mode, "backend": backend, "stage": stage,
                         "step_ms": 1000 * seconds / timed, "positions_per_s": positions / seconds,
                         "projected_share": projected / positions, "mfu": flops / seconds / peak if peak else None,
                         "peak_memory_gb": peak_memory_gb(device)})
        one, two = rows[-2], rows[-1]
        one["first_pass_ms"] = 1000 * sum(fresh) / timed
        two["speedup_over_stage1"] = one["step_ms"] / two["step_ms"]
        print(f"{name}: stage 1 {one['step_ms']:.1f} ms/step (first pass {one['first_pass_ms']:.1f}), MFU "
              f"{mfu_text(one['mfu'])}; stage 2 {two['step_ms']:.1f} ms/step ({two['speedup_over_stage1']:.2f}x)",
              flush=True)
        save_report(args, report)  # a section stopped at its budget keeps every setting measured so far
        with open(table_path, "a") as f:
            f.write(table + "\n\n")
        print("\n".join(table.splitlines()[:16]), flush=True)


SYNC_WARNING = "synchronizing CUDA operation"  # what torch.cuda.set_sync_debug_mode("warn") says


def host_waits(cfg, model, data, val, device: str, dtype) -> dict[str, int]:
    """Where two steps of train.train (stage 1, --grad_accum as the recipe's) make the host wait for the GPU:
    `file:line` -> times, from CUDA's sync debug mode (on a CPU nothing waits, and nothing is found). Both steps
    also log and validate (the first and the last step do): their lines show too."""
    import torch

    import sftkey
    import train
    cuda = device.startswith("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            train.train(model, data, val, dataclasses.replace(cfg, val_acc_n=0),
                        sftkey.Stage("sync check", (0.0, 1.0, 1.0), 2, cfg.lr), device, dtype, [])
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    return dict(collections.Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught
                                    if SYNC_WARNING in str(w.message)).most_common())


def profiler_table(step, first: int, device: str, title: str, steps: int = 3) -> str:
    """torch.profiler over `steps` stage-1 steps: the operators by self time on the device (CPU
    time on a CPU), and the kernels' total time (far below the steps' time: the host is the bound)."""
    import torch
    from torch.profiler import ProfilerActivity
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(first, first + steps):
                step(i, (0.0, 1.0, 1.0))
        wall = time.perf_counter() - start
        averages = prof.key_averages()
        if not cuda:
            return f"== {title}: {steps} steps\n" + averages.table(sort_by="self_cpu_time_total", row_limit=30)
        # kernel time: the rows of device events only (an operator's row repeats its kernels' time)
        busy = sum(e.self_device_time_total for e in averages
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / 1e6
        return (f"== {title}: {steps} steps, {wall * 1000:.1f} ms wall with the profiler on, kernels "
                f"{busy * 1000:.1f} ms\n" + averages.table(sort_by="self_device_time_total", row_limit=30))
    except Exception as err:  # the profiler is a diagnosis: its failure must not lose the figures above
        return f"== {title}: profiler failed: {type(err).__name__}: {err}"


def summary_table(report: dict) -> str:
    lines = ["| run | stage | steps | wall s | tokens/s (stage) | tokens/s (2nd half) | MFU | peak GPU memory GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in report.get("recipe", {}).get("runs", {}).items():
        for stage, r in run.get("stages", {}).items():
            steady = r.get("steady_tokens_per_s")
            lines.append(f"| {name} | {stage} | {r['steps']} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
                         f"{'-' if steady is None else f'{steady:,.0f}'} | {mfu_text(r['mfu'])} | "
                         f"{r.get('peak_memory_gb', float('nan')):.2f} |")
    evals = [(name, e) for name, run in report.get("recipe", {}).get("runs", {}).items()
             for e in run.get("evaluations", [])]
    lines += ["", "| run | after | greedy evaluation | seconds | Acc | Fmt |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {e['after']} | {e['problems']} problems | {e['seconds']:.1f} | {e['acc']:.3f} | "
              f"{number(e['fmt'])} |" for name, e in evals]
    kv = report.get("recipe", {}).get("kv_cache")
    if kv:
        lines += ["", "| greedy evaluation, eager final weights | problems | seconds | tokens generated | tokens/s |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| KV cache {label} | {r['problems']} | {r['seconds']:.1f} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} |"
                  for label, r in (("on", kv.get("cache")), ("off", kv.get("no_cache"))) if r]
        if "speedup" in kv:  # not when the cache-off evaluation was stopped at the budget
            lines.append(f"\nKV cache speedup {kv['speedup']:.2f}x; rows identical with and without: "
                         f"{kv['identical_rows']} of {kv['cache']['problems']}")
    rows = report.get("profile", {}).get("rows", [])
    if rows:
        lines += ["", "| micro-batch | mode | attention | stage | step ms (first pass) | positions/s | projected | MFU | "
                      "speedup | peak memory GB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['batch_size']} | {r['mode']} | {r['backend']} | {r['stage']} | {r['step_ms']:.1f}"
                  f"{'' if r.get('first_pass_ms') is None else ' (%.1f)' % r['first_pass_ms']} | "
                  f"{r['positions_per_s']:,.0f} | {r['projected_share']:.0%} | {mfu_text(r['mfu'])} | "
                  f"{number(r.get('speedup_over_stage1'))} | {number(r['peak_memory_gb'])} |" for r in rows if "error" not in r]
        failed = [f"not measured: micro-batch {r['batch_size']}, {r['mode']}, attention {r['backend']}: {r['error']}"
                  for r in rows if "error" in r]  # out of memory, say: named here, not only in the profile's log
        lines += [""] * bool(failed) + failed
    return "\n".join(lines)


def mfu_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def save_report(args, report: dict) -> None:
    """OUT/gpu_check.json (a worker's: OUT/SECTION.json), rewritten as figures come, so that a check stopped from
    outside keeps the rest; atomically, so that a kill during the write leaves the previous one."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.worker or 'gpu_check'}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


WORKERS = {"recipe": recipe, "profile": profile}  # the sections that run this script again, with --worker


def section_command(name: str, args, argv: list[str]) -> list[str]:
    """A section's command line. Each runs in a process of its own, which the budget can stop."""
    py, quick, run_dir = sys.executable, QUICK_RUN if args.quick else [], os.path.join(args.work_dir, name)
    if name in WORKERS:
        return [py, os.path.abspath(__file__), *argv, "--worker", name]
    if name == "tests":  # -v: a run stopped at the budget still names the tests that passed
        return [py, "-m", "pytest", "tests/test_cuda.py", "-v", "-rs"]
    if name == "bench":
        return [py, "bench.py", "--data", os.path.join(args.gsm8k, "train.jsonl"), "--json",
                os.path.join(args.out, "bench.json"), "--device", args.device, *(["--quick"] if args.quick else BENCH)]
    if name == "default":  # the README's first command, as it is
        return [py, "train.py", "--device", args.device, "--overwrite", "--out_dir", run_dir, *quick]
    quick_arms = ["--seeds", "1", "--e1", "3", "--e2", "2", "--n_boot", "50"] if args.quick else []
    return [py, "experiment.py", "--device", args.device, "--overwrite", "--out_dir", run_dir, *quick, *quick_arms]


def collect(name: str, args, report: dict) -> None:
    """What a section left besides its log: a worker's figures (OUT/NAME.json) into the report, and its runs'
    small files (results, logs) from --work_dir/NAME to OUT/NAME, without the checkpoints."""
    part = os.path.join(args.out, f"{name}.json")
    if name in WORKERS and os.path.isfile(part):
        with open(part) as f:
            report.setdefault(name, {}).update(json.load(f).get(name, {}))
    if os.path.isdir(os.path.join(args.work_dir, name)):
        shutil.copytree(os.path.join(args.work_dir, name), os.path.join(args.out, name), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.pt", "*.tmp", ".sftkey.lock"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.deadline = time.time() + args.budget_s if args.budget_s > 0 else math.inf
    if args.quick:
        args.stage1_iters, args.stage2_iters = min(args.stage1_iters, 3), min(args.stage2_iters, 2)
        args.eval_problems, args.limit = min(args.eval_problems, 2), args.limit or 100
    for split in ("train", "test"):
        if not os.path.isfile(os.path.join(args.gsm8k, f"{split}.jsonl")):
            print(f"error: --gsm8k {args.gsm8k}: no {split}.jsonl", file=sys.stderr)
            return 2
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(args.tiktoken_cache)  # before any encoding loads
    if args.quick:  # tiny models: threads cost more than they save
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.worker:  # one section in this process; run_section stops it at the budget
        if args.compile_backend:  # both workers compile (the recipe's --compile run, the profile's compiled mode)
            import runtime
            os.environ[runtime.COMPILE_BACKEND] = args.compile_backend
        part: dict = {}
        ok = WORKERS[args.worker](args, part) is not False
        save_report(args, part)
        return 0 if ok else 1
    import torch
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report: dict = {"device": args.device, "device_name": device_name, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "quick": args.quick}
    print(f"gpu_check on {args.device} ({device_name}), torch {torch.__version__}, CUDA {torch.version.cuda}",
          flush=True)
    started, ok, status = time.time(), True, 0
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        for name, seconds in args.sections:
            if time_left(args) <= 0:
                report[name] = {"skipped": "budget spent"}
                print(f"\n=== {name}: skipped, budget spent", flush=True)
                continue
            with contextlib.suppress(FileNotFoundError):  # an earlier check's figures are not this one's
                os.remove(os.path.join(args.out, f"{name}.json"))
            try:
                run_section(name, section_command(name, args, argv), min(seconds, time_left(args)), report, args.out)
            finally:  # on SIGTERM too
                collect(name, args, report)
                save_report(args, report)
            ok &= "stopped" in report[name] or report[name]["status"] == 0  # stopped at the budget is no failure
    except Terminated:
        report["stopped"], status = "SIGTERM", 143
    finally:
        signal.signal(signal.SIGTERM, previous)
        report["seconds"], report["ok"] = time.time() - started, ok
        save_report(args, report)
    if "recipe" in report or "profile" in report:
        print("\n" + summary_table(report), flush=True)
    cut = [f"{name} {r['stopped'] if 'stopped' in r else 'skipped, ' + r['skipped']}" for name, r in report.items()
           if isinstance(r, dict) and ("stopped" in r or "skipped" in r)]
    verdict = "stopped by SIGTERM" if status else "passed" if ok else "FAILED"
    print(f"\ngpu_check {verdict} in {report['seconds']:.0f} s{'; ' if cut else ''}"
          f"{'; '.join(cut)}; figures in {os.path.join(args.out, 'gpu_check.json')}", flush=True)
    return status or (0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
