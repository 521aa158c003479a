"""Check and measure a GPU in one command, offline (about 8 minutes on one H100/H200-class GPU):

    python scripts/gpu_check.py --gsm8k DIR --tiktoken_cache DIR [--out out/gpu_check]

1. the CUDA tests (pytest tests/test_cuda.py);
2. bench.py's tables on GSM8K train (bench.py --data DIR/train.jsonl);
3. the README's GPT-2-small recipe at GPT-2 small's shape (12 x 768, gpt2 vocabulary, random
   weights: no hub is needed), both stages (--stage1_iters / --stage2_iters steps), bf16 autocast,
   once eager and once with --compile. For each stage: steps, wall time (compilation and
   validation included), tokens/s over the whole stage and over its second half (compilation and
   warm-up left out), MFU, peak GPU memory. The eager run then greedily answers the first
   --eval_problems test problems and says how long that took (the compiled run scores one problem).

DIR holds GSM8K's train.jsonl and test.jsonl; the tiktoken cache folder holds GPT-2's BPE files
(TIKTOKEN_CACHE_DIR). `--quick --device cpu` is the smoke version the test suite runs
(tests/test_gpu_check.py): a 1-layer model, a few steps, a few problems. Everything printed also
goes to OUT/gpu_check.json. The exit status is 1 when a section failed; the others still run.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# GPT-2 small on GSM8K as the README's recipe has it, from random weights (hence a from-scratch lr).
RECIPE = ["--format", "gsm8k", "--encoding", "gpt2", "--block_size", "512", "--n_layer", "12", "--n_head", "12",
          "--n_embd", "768", "--batch_size", "16", "--grad_accum", "2", "--lr", "3e-4", "--warmup_iters", "30",
          "--log_interval", "25", "--eval_interval", "1000", "--eval_batch_size", "100", "--dtype", "bfloat16"]
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
    p.add_argument("--sections", default="tests,bench,recipe", help="comma-separated subset of tests,bench,recipe")
    p.add_argument("--stage1_iters", type=int, default=300)
    p.add_argument("--stage2_iters", type=int, default=200)
    p.add_argument("--eval_problems", type=int, default=200, help="test problems the eager run answers")
    p.add_argument("--limit", type=int, default=0, help="use the first N training problems only (0 = all)")
    p.add_argument("--compile_backend", default="", help="torch.compile backend (default inductor; the CPU smoke "
                                                         "test uses eager, inductor's C++ build taking minutes)")
    return p


def run_section(name: str, command: list[str], timeout: int, report: dict) -> None:
    """A subprocess whose output is passed through; its status and time go into `report`."""
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    start = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
        output, status = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output, status = f"{err.stdout or ''}\n{name}: timed out after {timeout} s", 124
    print(output[-6000:], flush=True)
    report[name] = {"status": status, "seconds": time.time() - start, "output_tail": output[-3000:]}


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
            self.torch.cuda.synchronize()

    def __enter__(self) -> StageProbe:
        self._train, self._evaluate, self._line = self.T.train, self.T.evaluate, self.R.Meter.line
        probe = self

        def train(*args, **kwargs):
            bound = inspect.signature(probe._train).bind(*args, **kwargs)
            stage, iters = bound.arguments["stage"], bound.arguments["iters"]
            probe._sync()
            if probe.device.startswith("cuda"):
                probe.torch.cuda.reset_peak_memory_stats()
            probe._marks, probe._stage, start = [], stage, time.time()
            optimizer = probe._train(*args, **kwargs)
            probe._sync()
            row = {"steps": iters, "seconds": time.time() - start}
            if probe.device.startswith("cuda"):
                row["peak_memory_gb"] = probe.torch.cuda.max_memory_allocated() / 2 ** 30
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
        print(f"\n=== recipe, {name}: python train.py {' '.join(flags + extra)}", flush=True)
        start = time.time()
        try:
            with StageProbe(train, runtime, torch, args.device) as probe:
                train.run(train.parse_args([*flags, *extra, "--out_dir", os.path.join(args.out, name)]))
            report["recipe"]["runs"][name] = {"stages": probe.stages, "evaluations": probe.evals,
                                              "seconds": time.time() - start}
        except Exception as err:  # report it and go on: the other run and the summary still count
            ok = False
            report["recipe"]["runs"][name] = {"error": f"{type(err).__name__}: {err}", "seconds": time.time() - start}
            print(f"recipe {name} failed: {type(err).__name__}: {err}", flush=True)
    return ok


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
    return "\n".join(lines)


def mfu_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        run_section("tests", [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-rs", "-x"], 300, report)
        ok &= report["tests"]["status"] == 0
    if "bench" in sections:
        bench_flags = ["--data", os.path.join(args.gsm8k, "train.jsonl"), "--json", os.path.join(args.out, "bench.json"),
                       "--device", args.device] + (["--quick"] if args.quick else [])
        run_section("bench", [sys.executable, "bench.py", *bench_flags], 300, report)
        ok &= report["bench"]["status"] == 0
    if "recipe" in sections:
        ok &= recipe(args, report)
        print("\n" + summary_table(report), flush=True)
    report["seconds"], report["ok"] = time.time() - started, ok
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\ngpu_check {'passed' if ok else 'FAILED'} in {report['seconds']:.0f} s; "
          f"figures in {os.path.join(args.out, 'gpu_check.json')}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
