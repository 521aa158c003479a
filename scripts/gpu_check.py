"""Check and measure a GPU in one command, offline (on one H200 the sections took over 10 minutes in all):

    python scripts/gpu_check.py --gsm8k DIR --tiktoken_cache DIR [--out out/gpu_check]

Sections (--sections picks some; each has a time limit, and a failed one does not stop the rest):
1. tests: the CUDA tests (pytest tests/test_cuda.py);
2. bench: bench.py's tables on GSM8K train at GPT-2 small's shape (12 x 768, batch 32);
3. recipe: the README's GPT-2-small recipe at GPT-2 small's shape (12 x 768, gpt2 vocabulary, random
   weights: no hub is needed), both stages (--stage1_iters / --stage2_iters steps), bf16 autocast,
   once eager and once with --compile. For each stage: steps, wall time (compilation and
   validation included), tokens/s over the whole stage and over its second half (compilation and
   warm-up left out), MFU, peak GPU memory. The eager run then greedily answers the first
   --eval_problems test problems and says how long that took (the compiled run scores one problem),
   and answers them again with the KV cache off (time, tokens/s, rows identical to the cached run);
4. profile: stage-1 and stage-2 steps at that shape on the same batches, eager and compiled, at
   micro-batches of 16 and 64: step time, tokens/s, MFU, the stage-2 speedup, and a torch.profiler
   table of stage-1 steps (OUT/profile.txt); then where two steps of train.train make the host wait
   for the GPU (file:line, from CUDA's sync debug mode);
5. default, experiment: `python train.py` and `python experiment.py` as they are, on --device.

DIR holds GSM8K's train.jsonl and test.jsonl; the tiktoken cache folder holds GPT-2's BPE files
(TIKTOKEN_CACHE_DIR). `--quick --device cpu` is the smoke version the test suite runs
(tests/test_gpu_check.py): a 1-layer model, a few steps, a few problems. Everything printed also
goes to OUT/gpu_check.json. The exit status is 1 when a section failed; the others still run.
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
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# GPT-2 small on GSM8K as the README's recipe has it, from random weights (hence a from-scratch lr).
RECIPE = ["--format", "gsm8k", "--encoding", "gpt2", "--block_size", "512", "--n_layer", "12", "--n_head", "12",
          "--n_embd", "768", "--batch_size", "16", "--grad_accum", "2", "--lr", "3e-4", "--warmup_iters", "30",
          "--log_interval", "25", "--eval_interval", "1000", "--eval_batch_size", "100", "--dtype", "bfloat16"]
SECTIONS = ("tests", "bench", "recipe", "profile", "default", "experiment")
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
    p.add_argument("--out", default=os.path.join(ROOT, "out", "gpu_check"), help="checkpoints, logs, gpu_check.json")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the smoke version)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps: a smoke test of this script")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--stage1_iters", type=int, default=300)
    p.add_argument("--stage2_iters", type=int, default=200)
    p.add_argument("--eval_problems", type=int, default=200, help="test problems the eager run answers")
    p.add_argument("--limit", type=int, default=0, help="use the first N training problems only (0 = all)")
    p.add_argument("--profile_batches", default="16,64", help="profile: micro-batch sizes (comma-separated)")
    p.add_argument("--profile_modes", default="eager,compiled", help="profile: eager and/or compiled")
    p.add_argument("--profile_backends", default="default", help="profile: attention backends of "
                   "scaled_dot_product_attention: default (PyTorch's choice), flash, efficient, cudnn, math")
    p.add_argument("--budget_s", type=float, default=0, help="seconds for the whole check (0 = no limit): each "
                   "section's time limit is cut to what is left, and no run or profile setting starts once it is "
                   "spent, so a check under an outer limit (e.g. 540 under 600) ends by itself, its JSON complete")
    p.add_argument("--compile_backend", default="", help="torch.compile backend (default inductor; the CPU smoke "
                                                         "test uses eager, inductor's C++ build taking minutes)")
    return p


def run_section(name: str, command: list[str], timeout: float, report: dict, log_dir: str | None = None) -> None:
    """A subprocess whose status and time go into `report`. Its output is written to
    LOG_DIR/NAME.log as it comes (a section killed from outside still leaves what it printed)
    and its tail printed at the end."""
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    start, status = time.time(), 0
    log_path = os.path.join(log_dir, f"{name}.log") if log_dir else None
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    with (open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")) as log:
        try:
            status = subprocess.run(command, cwd=ROOT, timeout=timeout, stdout=log, stderr=subprocess.STDOUT).returncode
        except subprocess.TimeoutExpired:
            status = 124
            log.write(f"\n{name}: timed out after {timeout:.0f} s\n")
        log.seek(0)
        output = log.read()
    print(output[-6000:], flush=True)
    report[name] = {"status": status, "seconds": time.time() - start, "output_tail": output[-3000:]}


def time_left(args) -> float:
    """Seconds left of --budget_s (inf without one)."""
    return getattr(args, "deadline", math.inf) - time.time()


def limit(args, seconds: float) -> float:
    """A section's time limit, cut to the time left of --budget_s (at least 1 s: it then times out at once)."""
    return max(1.0, min(seconds, time_left(args)))


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
    its peak GPU memory and the evaluation, without touching the project's code."""

    def __init__(self, train_module, runtime_module, torch_module, device: str):
        self.T, self.R, self.torch, self.device = train_module, runtime_module, torch_module, device
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
    """The GPT-2-small recipe, eager then compiled, in this process. Returns whether both ran."""
    import torch

    import runtime
    import train
    os.makedirs(args.out, exist_ok=True)
    data, test = (os.path.join(args.gsm8k, f"{split}.jsonl") for split in ("train", "test"))
    if args.limit:  # the first N lines only, in a file of their own
        data = os.path.join(args.out, "train_head.jsonl")
        with open(os.path.join(args.gsm8k, "train.jsonl"), encoding="utf-8") as f, open(data, "w") as g:
            g.writelines(line for _, line in zip(range(args.limit), f))
    flags = [*RECIPE, *(QUICK if args.quick else []), "--data", data, "--eval_data", test, "--device", args.device,
             "--max_iters", str(args.stage1_iters), "--stage2_iters", str(args.stage2_iters),
             "--overwrite"]  # a rerun of the check replaces its own earlier runs
    if args.compile_backend:
        os.environ[runtime.COMPILE_BACKEND] = args.compile_backend
    report["recipe"] = {"flags": flags, "runs": {}}
    ok = True
    for name, extra in (("eager", ["--eval_limit", str(args.eval_problems)]), ("compile", ["--compile", "--eval_limit", "1"])):
        if time_left(args) <= 0:
            ok = False
            report["recipe"]["runs"][name] = {"skipped": "no time left (--budget_s)"}
            print(f"recipe {name}: skipped, no time left (--budget_s)", flush=True)
            continue
        print(f"\n=== recipe, {name}: python train.py {' '.join(flags + extra)}", flush=True)
        start = time.time()
        try:
            with StageProbe(train, runtime, torch, args.device) as probe:
                train.run(train.parse_args([*flags, *extra, "--out_dir", os.path.join(args.out, name)]))
            report["recipe"]["runs"][name] = {"stages": probe.stages, "evaluations": probe.evals,
                                              "seconds": time.time() - start}
            save_report(args.out, report)  # a check stopped from outside keeps this run
            if name == "eager" and time_left(args) > 0:
                report["recipe"]["kv_cache"] = kv_cache_evaluation(args, [*flags, *extra], os.path.join(args.out, name))
        except Exception as err:  # report it and go on: the other run and the summary still count
            ok = False
            report["recipe"]["runs"][name] = {"error": f"{type(err).__name__}: {err}", "seconds": time.time() - start}
            print(f"recipe {name} failed: {type(err).__name__}: {err}", flush=True)
        save_report(args.out, report)
    return ok


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def kv_cache_evaluation(args, flags: list[str], run_dir: str) -> dict:
    """train.evaluate on the run's final weights, with the KV cache (as always) and without it."""
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
    generate, rows, outputs = GPT.generate, {}, {}
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
        print(f"evaluation, KV cache {'on' if use_cache else 'off'}: {len(test)} problems, {tokens} tokens "
              f"generated in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s)", flush=True)
    same = sum(a == b for a, b in zip(outputs[True], outputs[False]))
    return {**rows, "identical_rows": same, "speedup": rows["no_cache"]["seconds"] / rows["cache"]["seconds"]}


def profile(args, report: dict) -> None:
    """Stage-1 and stage-2 steps at the recipe's shape, eager and compiled, per attention backend.

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
    device, dtype = runtime.resolve_device(cfg)
    runtime.set_up_device(device, cfg.seed)
    examples = D.read_examples(os.path.join(args.gsm8k, "train.jsonl"), cfg.format)[:args.limit or None]
    data = D.tokenize(examples, enc, cfg.block_size, name="gsm8k train")
    model = GPT(ckpts.model_config(cfg, enc)).to(device)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, 0.95), device.split(":")[0])
    peak = runtime.peak_flops(device, dtype)
    warmup, timed = (1, 2) if args.quick else (3, 12)
    stages = {"stage 1": (0.0, 1.0, 1.0), "stage 2": (0.0, 0.0, 1.0)}
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    settings = [(b, m, k) for b in map(int, args.profile_batches.split(",")) for m in args.profile_modes.split(",")
                for k in args.profile_backends.split(",")]
    rows: list[dict] = []
    report["profile"] = {"peak_flops": peak, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    table_path = os.path.join(args.out, "profile.txt")
    open(table_path, "w").close()
    for n, (batch_size, mode, backend) in enumerate(settings):
        if time_left(args) <= 0:
            rows.append({"batch_size": batch_size, "mode": mode, "backend": backend, "error": "skipped: no time left"})
            print(f"batch {batch_size}, {mode}, attention {backend}: skipped, no time left (--budget_s)", flush=True)
            continue
        reset_peak_memory(device)  # each setting's own peak, not the largest of the process so far
        batches = D.Batches(data, batch_size, cfg.seed)
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
        try:
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
            save_report(args.out, report)
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
        save_report(args.out, report)  # a check stopped from outside keeps every setting measured so far
        with open(table_path, "a") as f:
            f.write(table + "\n\n")
        print("\n".join(table.splitlines()[:16]), flush=True)
    if time_left(args) > 0:
        val = D.tokenize(examples[:cfg.batch_size], enc, cfg.block_size, name="sync check")
        report["profile"]["host_waits"] = sites = host_waits(cfg, model, data, val, device, dtype)
        print("the host waits for the GPU in two steps of train.train (file:line: times; CUDA's sync debug mode): "
              + (", ".join(f"{k}: {v}" for k, v in sites.items()) or "nowhere"), flush=True)


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
                  for label, r in (("on", kv["cache"]), ("off", kv["no_cache"]))]
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
    return "\n".join(lines)


def mfu_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def save_report(out: str, report: dict) -> None:
    """OUT/gpu_check.json, rewritten after each section so that a check killed from outside keeps the rest."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)


def main(argv: list[str] | None = None) -> int:
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
    import torch
    sections = set(args.sections.split(","))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report: dict = {"device": args.device, "device_name": device_name, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "quick": args.quick}
    print(f"gpu_check on {args.device} ({device_name}), torch {torch.__version__}, CUDA {torch.version.cuda}",
          flush=True)
    started, ok = time.time(), True
    if "tests" in sections:
        tests = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-rs"]
        run_section("tests", tests, limit(args, 300), report, args.out)
        ok &= report["tests"]["status"] == 0
        save_report(args.out, report)
    if "bench" in sections:
        bench_flags = ["--data", os.path.join(args.gsm8k, "train.jsonl"), "--json", os.path.join(args.out, "bench.json"),
                       "--device", args.device] + (["--quick"] if args.quick else BENCH)
        run_section("bench", [sys.executable, "bench.py", *bench_flags], limit(args, 300), report, args.out)
        ok &= report["bench"]["status"] == 0
        save_report(args.out, report)
    if "recipe" in sections:
        ok &= recipe(args, report)
        save_report(args.out, report)
    if "profile" in sections:
        try:
            profile(args, report)
        except Exception as err:  # report it and go on
            ok = False
            report.setdefault("profile", {})["error"] = f"{type(err).__name__}: {err}"  # keeps the rows measured
            print(f"profile failed: {type(err).__name__}: {err}", flush=True)
        save_report(args.out, report)
    if sections & {"recipe", "profile"}:
        print("\n" + summary_table(report), flush=True)
    quick = QUICK_RUN if args.quick else []
    if "default" in sections:  # the README's first command, as it is
        run_section("default", [sys.executable, "train.py", "--device", args.device, "--overwrite", "--out_dir",
                                os.path.join(args.out, "default"), *quick], limit(args, 900), report, args.out)
        ok &= report["default"]["status"] == 0
        save_report(args.out, report)
    if "experiment" in sections:
        quick_arms = ["--seeds", "1", "--e1", "3", "--e2", "2", "--n_boot", "50"] if args.quick else []
        command = [sys.executable, "experiment.py", "--device", args.device, "--overwrite", "--out_dir",
                   os.path.join(args.out, "experiment"), *quick, *quick_arms]
        run_section("experiment", command, limit(args, 1800), report, args.out)
        ok &= report["experiment"]["status"] == 0
    report["seconds"], report["ok"] = time.time() - started, ok
    save_report(args.out, report)
    print(f"\ngpu_check {'passed' if ok else 'FAILED'} in {report['seconds']:.0f} s; "
          f"figures in {os.path.join(args.out, 'gpu_check.json')}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
