"""The experiment: the paper's four arms, the controls it lacked, several seeds, paired statistics.

    python experiment.py                       # six arms, 3 seeds (about 30 minutes on 2 CPU cores)
    python experiment.py --arms sft_tag,sftkey_tag,sftsft_tag --seeds 2 --e1 200 --e2 40
    python experiment.py --arms sft_tag,sftkey_tag,sftsft_tag --stage2_lrs 1e-5,3e-5,1e-4,3e-4 --val_acc_n 200
    python experiment.py --arms weighted,sft_tag_e1e2   # the up-weighting control against its schedule alone
    python experiment.py --arms sft_tag,sftkey_tag,sftsft_tag,sftdft_tag   # with the DFT control (not by default)

Each arm is a train.py run (`arm_config` gives its flags; `python train.py` is sftkey_tag), planned
into stages by train.plan_stages, on the examples both layouts keep (`layout_data`). `sftkey_tag`
(the method) and `sftsft_tag` (the compute-matched control, `--stage2_weights 0,1,1`) both continue
from sft_tag's stage with a fresh optimizer, the same stage-2 schedule and the data stream read on,
so the only difference between them is the loss on the reasoning tokens. Stages that arms share are
trained once per seed and kept in memory. Each seed changes the initial weights, the data order and
the validation split; the test problems stay the same (--data_seed or --eval_data fixes them). On
the synthetic tasks every response is also scored for its reasoning, right only when it is the
problem's worked solution (`reasoning_scores`).

Outputs in --out_dir, rewritten (atomically) after every arm: results.md, results.json, loss_log.jsonl;
at the end, when matplotlib is installed, val_loss.png and accuracy.png (--plot_only redraws them later).
Every flag of train.py applies to every arm, except those that set the loss and the layout (the arms
set them), --resume, --eval_only, --ckpt_interval and --show_roles: those are refused. --e1, --e2 and
--lam are other names for --max_iters, --stage2_iters and --key_weight.
"""
from __future__ import annotations

if __name__ == "__main__":
    import startup  # noqa: F401  (first, before torch loads: a stop signal now ends in one line)

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import checkpoints as ckpts
import data as D
import plots
import runtime
import sftkey
import train
from model import GPT, GPTConfig

ARM_NAMES = ("sft", "sft_tag", "key_tag", "sftkey_tag", "sftsft_tag", "sftdft_tag", "weighted", "sft_tag_e1e2")
DEFAULT_ARMS = tuple(n for n in ARM_NAMES if n not in ("sftdft_tag", "sft_tag_e1e2"))  # near 30 min on 2 CPU cores
COMPARISONS = (("sftkey_tag", "sft_tag"), ("sftkey_tag", "sftsft_tag"), ("sftkey_tag", "sftdft_tag"),
               ("sftdft_tag", "sftsft_tag"), ("sftkey_tag", "weighted"),
               ("weighted", "sft_tag_e1e2"))
SWEPT = ("sftkey_tag", "sftsft_tag", "sftdft_tag")  # the arms --stage2_lrs trains at every lr (from one stage 1)
METRICS = ("acc", "fmt", "composite")
REASONING = ("reasoning", "acc_reasoning_right", "acc_reasoning_wrong")  # the synthetic tasks only
ABOUT = {"sft": "untagged SFT, E1", "sft_tag": "tagged SFT, E1", "key_tag": "key only from the initial weights, E1",
         "sftkey_tag": "sft_tag, then E2 key only (the method)",
         "sftsft_tag": "sft_tag, then E2 more tagged SFT (compute-matched control)",
         "sftdft_tag": "sft_tag, then E2 tagged SFT, each token's loss x its probability (DFT control)",
         "weighted": "one stage of E1+E2 with key weight λ (up-weighting control)",
         "sft_tag_e1e2": "one stage of E1+E2, key weight 1 (weighted's schedule without λ)"}
# The train.py flags each arm sets; every other flag is the user's. E1, E2, λ are --max_iters,
# --stage2_iters, --key_weight. An arm is a train.py run: `python train.py` is sftkey_tag.
ARM_FLAGS = {"weights": "0,1,1", "stage2_weights": "0,0,1", "stage2_dft": False, "key_only": False, "key_weight": 1.0,
             "untagged": False}


def variant(arm: str, stage2_lr: float) -> str:
    """The name of `arm` trained at stage-2 peak lr `stage2_lr` in a sweep (letters, digits, `._+-`: a folder name);
    repr writes the float exactly, so arm_config reads back the very lr given."""
    return f"{arm}.lr{stage2_lr!r}"


def arm_config(cfg: train.TrainConfig, name: str) -> train.TrainConfig:
    """The train.py configuration of an arm (or a sweep's `variant` of one): the experiment's flags, with the
    loss, layout and steps it sets."""
    name, _, stage2_lr = name.partition(".lr")
    own = {"sft": {"untagged": True, "stage2_iters": 0}, "sft_tag": {"stage2_iters": 0},
           "key_tag": {"weights": "0,0,1", "stage2_iters": 0}, "sftkey_tag": {},
           "sftsft_tag": {"stage2_weights": "0,1,1"}, "sftdft_tag": {"stage2_weights": "0,1,1", "stage2_dft": True},
           "weighted": {"weights": f"0,1,{cfg.key_weight!r}", "max_iters": cfg.max_iters + cfg.stage2_iters,
                        "stage2_iters": 0},
           "sft_tag_e1e2": {"max_iters": cfg.max_iters + cfg.stage2_iters, "stage2_iters": 0}}
    if name not in own:
        raise ValueError(f"--arms: unknown arm {name}; choose from {', '.join(ARM_NAMES)}")
    swept = {"stage2_lr": float(stage2_lr)} if stage2_lr else {}
    return dataclasses.replace(cfg, **{**ARM_FLAGS, **own[name], **swept})


def layout_data(cfg: train.TrainConfig, names: list[str], enc, raw: dict[str, bytes]) -> dict[bool, tuple]:
    """(training, validation, test) sets of each layout the arms `names` use (True: tagged) at cfg.seed. An example
    too long for --block_size in one layout is dropped from the other too: the sft arm differs in its layout only."""
    step = cfg.batch_size * cfg.grad_accum  # examples one optimizer step draws
    configs = {not c.untagged: c for c in (arm_config(cfg, name) for name in names)}  # one per layout
    sets = {tagged: D.load_data(c, enc, raw, step) for tagged, c in configs.items()}
    if len(sets) < 2:
        return sets
    both = set.intersection(*({ex for s in layout[:2] for ex in s.examples} for layout in sets.values()))
    for tagged, (train_set, val_set, test) in sets.items():
        sets[tagged] = (*(_keep_only(s, both, enc, cfg.block_size, tagged) for s in (train_set, val_set)), test)
        if len(sets[tagged][0].ids) < step:
            raise D.DataError(f"{cfg.data or 'synthetic task'}: {len(sets[tagged][0].ids)} training examples fit "
                              f"--block_size {cfg.block_size} in both layouts, fewer than the {step} of one optimizer "
                              f"step (--batch_size x --grad_accum); raise --block_size, or lower those two")
    return sets


def _keep_only(tokenized: D.TokenizedSet, examples: set, enc, block_size: int, tagged: bool) -> D.TokenizedSet:
    """`tokenized` (itself when nothing goes) with only the `examples` (Example compares by content)."""
    kept = [ex for ex in tokenized.examples if ex in examples]
    if len(kept) == len(tokenized.examples):
        return tokenized
    if not kept:
        raise D.DataError(f"{tokenized.summary['name']}: none of its examples fits --block_size {block_size} in both "
                          f"layouts (the sft arm's and the tagged arms'); raise --block_size")
    out = D.tokenize(kept, enc, block_size, tagged, tokenized.summary["name"])  # the summary of what is kept
    out.summary = {**tokenized.summary, **{k: v for k, v in out.summary.items() if k != "dropped_too_long"},
                   "dropped_in_other_layout": len(tokenized.examples) - len(kept)}
    return out


def about(name: str, key_weight: float) -> str:
    arm, _, stage2_lr = name.partition(".lr")
    return ABOUT[arm].replace("λ", f"{key_weight:g}") + (f", stage-2 peak lr {stage2_lr}" if stage2_lr else "")


def arm_stages(cfg: train.TrainConfig, name: str, before: str = "") -> list[sftkey.Stage]:
    """An arm's stages; `before` is the stage an --init_from checkpoint ended (ckpts.Inputs.origin)."""
    return train.plan_stages(arm_config(cfg, name), before)


# ---------------------------------------------------------------------------------------------
# Statistics (numpy only, so they can be checked on constructed inputs)

def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t distribution with `df` degrees of freedom, by integrating its density
    numerically (numpy suffices): over x = tan(θ), whose integrand stays bounded however heavy the tails."""
    if not 0.5 < p < 1:
        raise ValueError(f"t_quantile: p must be in (0.5, 1), got {p}")
    theta = np.linspace(0.0, np.pi / 2 * (1 - 1e-9), 400_001)
    x = np.tan(theta)
    density = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    integrand = density * (1 + x * x / df) ** (-(df + 1) / 2) * (1 + x * x)  # dx = (1 + x²) dθ
    cdf = 0.5 + np.concatenate([[0.0], np.cumsum((integrand[1:] + integrand[:-1]) / 2 * (theta[1] - theta[0]))])
    return float(np.tan(np.interp(p, cdf, theta)))


def paired_comparison(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Mean of a - b over seeds and test items, with three confidence intervals.

    `a` and `b` are (seeds, items) per-item scores of two arms on the same test items. `ci`, the one to
    read, covers what varies from seed to seed on these test problems: a t-interval over the per-seed
    mean differences (each already averages its seed's test problems), so it needs 2 seeds. The problems
    are the same for every seed, so it does not cover which problems were drawn.
    `ci_items` resamples test problems only (a paired percentile bootstrap: the same item indices for
    every seed), so it is too narrow whenever seeds disagree; it is kept to show how much narrower.
    `ci_both` covers both, other seeds and other test problems: `ci` with the problems' share of the
    variance added, the variance of the per-problem means over n less the seed-by-problem noise they
    share with the per-seed means (two-way ANOVA: residual mean square / (seeds x n)), clipped at 0, so
    never narrower than `ci`. The variance is unbiased for crossed seeds and problems; the degrees of
    freedom stay the seeds', conservative where the problems' share dominates. Needs 2 seeds, 2 problems.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"paired_comparison needs two equal, non-empty (seeds, items) arrays; "
                         f"got {a.shape} and {b.shape}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"paired_comparison: level must be in (0, 1) and n_boot >= 1, got {level} and {n_boot}")
    diff = a - b
    item_means = diff.mean(axis=0)  # averaging over seeds first is the same as resampling columns of diff
    rng = np.random.default_rng(seed)
    n = item_means.size
    boots = np.concatenate([item_means[rng.integers(0, n, size=(min(1000, n_boot - i), n))].mean(axis=1)
                            for i in range(0, n_boot, 1000)])  # in chunks: bounded memory for large n
    tail = (1 - level) / 2
    low, high = np.quantile(boots, [tail, 1 - tail])
    per_seed, mean, seeds = diff.mean(axis=1), float(diff.mean()), diff.shape[0]
    halves = [math.nan, math.nan]  # of ci and ci_both: 2 seeds needed, and for ci_both 2 problems
    if seeds > 1:
        var_seeds = per_seed.var(ddof=1) / seeds  # holds the seed-by-problem noise: residual / (seeds x n)
        residual = ((diff - per_seed[:, None] - item_means + mean) ** 2).sum() / ((seeds - 1) * max(n - 1, 1))
        var_items = max(item_means.var(ddof=1) / n - residual / (seeds * n), 0.0) if n > 1 else math.nan
        halves = [t_quantile(1 - tail, seeds - 1) * math.sqrt(v) for v in (var_seeds, var_seeds + var_items)]
    ci, ci_both = (None if math.isnan(half) else [mean - half, mean + half] for half in halves)
    return {"mean": mean, "ci": ci, "ci_both": ci_both, "ci_items": [float(low), float(high)], "level": level,
            "per_seed": per_seed.tolist(), "n_items": n, "n_seeds": seeds, "n_boot": n_boot}


def item_scores(result: dict, metric: str) -> np.ndarray | None:
    """Per-item Acc (0/1), Composite (0.7 x correct + 0.3 x formatted) or right reasoning (0/1); None where
    undefined."""
    correct = np.asarray(result["correct"], dtype=np.float64)
    if metric == "acc":
        return correct
    if metric == "reasoning":
        return np.asarray(result["reasoning_right"], dtype=np.float64) if "reasoning_right" in result else None
    if result["formatted"] is None:
        return None
    return sftkey.composite(correct, np.asarray(result["formatted"], dtype=np.float64))


def written_reasoning(response: str, tagged: bool) -> str | None:
    """The reasoning a response wrote: between `<Thinking>` at its start and the first `</Thinking>` (tagged), or
    everything before its last line "#### answer" (untagged); None when it has no such part."""
    if tagged:
        before, closed, _ = response.partition(sftkey.THINK_CLOSE)
        return before[len(sftkey.THINK_OPEN):].strip() if closed and before.startswith(sftkey.THINK_OPEN) else None
    before, closed, _ = response.rpartition(sftkey.UNTAGGED_KEY_PREFIX.rstrip())
    return before.strip() if closed else None


def reasoning_scores(result: dict, test: list[D.Example], tagged: bool) -> dict:
    """Whether each response wrote the worked solution of its problem as its reasoning, character for character
    (a synthetic problem has one: the chain it was trained on), the share that did, and Acc among the responses
    that did and that did not: does an arm answer worse because it reasons worse, or despite reasoning right?"""
    right = np.array([written_reasoning(r["response"], tagged) == ex.thinking
                      for r, ex in zip(result["responses"], test, strict=True)], dtype=bool)
    correct = np.asarray(result["correct"], dtype=bool)
    return {"reasoning_right": right.tolist(), "reasoning": float(right.mean()),
            "acc_reasoning_right": float(correct[right].mean()) if right.any() else None,
            "acc_reasoning_wrong": float(correct[~right].mean()) if not right.all() else None}


def aggregate(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds (std None with one seed; metrics None where undefined)."""
    out = {}
    for key in (*METRICS, *REASONING, "val_acc", "train_seconds", "last_stage_seconds"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = {"mean": float(np.mean(values)) if values else None,
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}
    return out


def pick(results: dict[str, list[dict]], arm: str) -> str | None:
    """The setting of a swept `arm` to compare: its variant with the highest validation Acc (at the last step,
    mean over seeds; a tie goes to the one listed first). Validation only: the test set never chooses."""
    scores = {n: float(np.mean([r["val_acc"] for r in runs])) for n, runs in results.items()
              if n.partition(".lr")[0] == arm and ".lr" in n and all(r.get("val_acc") is not None for r in runs)}
    # Within 1e-9 is a tie: equal totals of k/n values can differ in the last bit of their means (found in review:
    # a parity tie went to the later setting by 1e-16), and that is no evidence.
    return next(n for n, v in scores.items() if v >= max(scores.values()) - 1e-9) if scores else None


def compare(results: dict[str, list[dict]], n_boot: int, seed: int) -> dict[str, dict]:
    """The COMPARISONS whose two arms were both run, on Acc, Composite and (synthetic tasks) reasoning; in a sweep,
    those of two swept arms at each setting, and at the settings `pick` chose for each (best against best)."""
    picked = {arm: name for arm in SWEPT if (name := pick(results, arm))}
    lrs = sorted({float(n.partition(".lr")[2]) for n in results if ".lr" in n})
    pairs = [(picked.get(a, a), picked.get(b, b)) for a, b in COMPARISONS]  # a swept arm at its picked setting
    pairs += [(variant(a, lr), variant(b, lr)) for a, b in COMPARISONS if {a, b} <= set(SWEPT) for lr in lrs]
    out = {}
    for a, b in dict.fromkeys(pairs):
        if a not in results or b not in results or [r["seed"] for r in results[a]] != [r["seed"] for r in results[b]]:
            continue
        entry = {}
        for metric in ("acc", "composite", "reasoning"):
            sa = [item_scores(r, metric) for r in results[a]]
            sb = [item_scores(r, metric) for r in results[b]]
            if any(s is None for s in sa + sb):
                continue
            entry[metric] = paired_comparison(np.stack(sa), np.stack(sb), n_boot=n_boot, seed=seed)
        out[f"{a} - {b}" + (" (best vs best)" if {a, b} <= set(picked.values()) else "")] = entry
    return out


# ---------------------------------------------------------------------------------------------
# Running the arms

def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Trained:
    """An arm's state after its first stages, kept for the arms that begin with the same stages."""
    config: GPTConfig
    weights: dict[str, torch.Tensor]
    rng: dict  # so that dropout draws on as if each arm had trained those stages itself
    seconds: list[float]  # per stage
    rows: list[dict]  # their log rows


def run_seed(cfg: train.TrainConfig, names: list[str], enc, device: str, dtype: torch.dtype, on_result,
             save_ckpt: bool = False, inputs: ckpts.Inputs | None = None,
             stop: runtime.StopSignal | None = None) -> None:
    """Every arm in `names` at the seed cfg.seed, each trained through its stages as train.py would.

    Stages that arms share from the start are trained once: sftkey_tag and sftsft_tag both begin
    with sft_tag's stage, so the state after it is kept in memory and both continue from it (with the
    data stream read on where it stopped). `on_result(arm, result, log_rows)` follows each arm.
    `inputs`: the input files, read once (ckpts.read_inputs; read here when not given); `stop`: the experiment's
    StopSignal, which a --save_ckpt write finishes before it stops.
    """
    inputs = inputs or ckpts.read_inputs(cfg)
    before, start = inputs.origin
    plans = {name: (not arm_config(cfg, name).untagged, tuple(arm_stages(cfg, name, before))) for name in names}
    shared = {(tagged, stages[:j]) for tagged, stages in plans.values() for j in range(1, len(stages))}
    kept: dict[tuple, Trained] = {}  # (tagged, the stages trained) -> the state after them
    datasets = layout_data(cfg, names, enc, inputs.raw)  # both layouts of the same examples, once per seed
    for name in names:
        arm_cfg, (tagged, stages) = arm_config(cfg, name), plans[name]
        train_set, val_set, test = datasets[tagged]
        done = max((j for j in range(1, len(stages) + 1) if (tagged, stages[:j]) in kept), default=0)
        if done:  # an earlier arm trained this arm's first `done` stages
            state = kept[tagged, stages[:done]]
            model = GPT(state.config).to(device)  # the shape the first stage had
            model.load_state_dict(state.weights)
            ckpts.restore_rng(state.rng)
            seconds, rows = list(state.seconds), list(state.rows)
        else:
            torch.manual_seed(cfg.seed)  # every arm starts from the same initial weights at this seed
            model, seconds, rows = ckpts.build_model(arm_cfg, enc, device, inputs), [], []
        optimizer = None
        for j in range(done, len(stages)):
            stage, offset, log, t0 = stages[j], start + sum(s.iters for s in stages[:j]), [], time.time()
            optimizer = train.train(model=model, train_set=train_set, val_set=val_set, cfg=arm_cfg, stage=stage,
                                    device=device, dtype=dtype, log=log, steps_before=offset)
            seconds.append(time.time() - t0)
            rows += [{"global_step": offset - start + row["step"], **row} for row in log]
            if (tagged, stages[:j + 1]) in shared:
                kept[tagged, stages[:j + 1]] = Trained(model.config, snapshot(model), ckpts.rng_state(),
                                                       list(seconds), list(rows))
        if save_ckpt:
            path = ckpts.owned_path(cfg.out_dir, f"seed{cfg.seed}", name, ckpts.CKPT_NAME)
            ckpts.save_checkpoint(path, model, optimizer, arm_cfg, stages[-1].iters, {
                "stage": stages[-1].name, "stream_start": start + sum(s.iters for s in stages[:-1]),
                "file_hashes": inputs.sha256}, stop)  # as train.py's: sample.py checks a tokenizer file by them
        t1 = time.time()
        result = train.evaluate(model=model, enc=enc, examples=test, cfg=arm_cfg, device=device, dtype=dtype)
        val_rows = [row for row in rows if row.get("val_acc") is not None]  # --val_acc_n prompts, at each interval
        result.update(seed=cfg.seed, steps=sum(s.iters for s in stages), train_seconds=sum(seconds),
                      last_stage_seconds=seconds[-1], eval_seconds=time.time() - t1,
                      val_acc=val_rows[-1]["val_acc"] if val_rows else None)
        if not cfg.data:  # a synthetic problem's worked solution is the one right reasoning; real data has many
            result.update(reasoning_scores(result, test, tagged))
        with stop.deferred() if stop else contextlib.nullcontext():  # the result printed is the result written
            on_result(name, result, [{"arm": name, "seed": cfg.seed, **row} for row in rows])


class Recorder:
    """Collects results and loss rows and rewrites every output file after each arm."""

    def __init__(self, cfg: train.TrainConfig, names: list[str], seeds: list[int], n_boot: int, before: str = "",
                 machine: dict | None = None):
        self.cfg, self.names, self.seeds, self.n_boot, self.machine = cfg, names, seeds, n_boot, machine
        self.stages = {n: [dataclasses.asdict(s) for s in arm_stages(cfg, n, before)] for n in names}
        self.results: dict[str, list[dict]] = {n: [] for n in names}
        self.rows: list[dict] = []

    def add(self, name: str, result: dict, rows: list[dict]) -> None:
        self.results[name].append(result)
        self.rows += rows
        r, num = result, runtime.number
        print(f"seed {r['seed']} | {name}: Acc {num(r['acc'])} | Fmt {num(r['fmt'])} | Composite "
              f"{num(r['composite'])}" + (f" | reasoning right {num(r['reasoning'])}" if "reasoning" in r else "")
              + f" on {r['n']} test problems | trained {r['steps']} steps in {r['train_seconds']:.0f} s", flush=True)
        self.write(complete=False)

    def flags(self) -> dict:
        """The experiment's own flags, so that the "config" block given to --config repeats the whole experiment."""
        arms, lrs = zip(*(n.partition(".lr")[::2] for n in self.names))  # variant(): "sftkey_tag.lr0.0001"
        return {"arms": ",".join(dict.fromkeys(arms)), "seeds": len(self.seeds), "n_boot": self.n_boot,
                "stage2_lrs": ",".join(dict.fromkeys(lr for lr in lrs if lr))}

    def summary(self, complete: bool) -> dict:
        done = {n: runs for n, runs in self.results.items() if runs}
        full = {n: runs for n, runs in done.items() if len(runs) == len(self.seeds)}
        return {"complete": complete, "config": {**dataclasses.asdict(self.cfg), **self.flags()}, "seeds": self.seeds,
                "n_boot": self.n_boot,
                "arms": {n: {"about": about(n, self.cfg.key_weight),
                             "tagged": not arm_config(self.cfg, n).untagged,
                             "stages": self.stages[n]} for n in self.names},
                "results": done, "aggregates": {n: aggregate(runs) for n, runs in done.items()},
                "comparisons": compare(full, self.n_boot, self.cfg.seed),
                "picked": {arm: name for arm in SWEPT if (name := pick(full, arm))},
                "machine": self.machine}

    def write(self, complete: bool) -> dict:
        summary = self.summary(complete)
        out = self.cfg.out_dir
        ckpts.write_json(ckpts.owned_path(out, "results.json"), summary)
        ckpts.write_text(ckpts.owned_path(out, "results.md"), markdown(summary))
        ckpts.write_text(ckpts.owned_path(out, "loss_log.jsonl"), "".join(json.dumps(r) + "\n" for r in self.rows))
        return summary


# ---------------------------------------------------------------------------------------------
# Reporting

def _mean_std(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    return runtime.number(stat["mean"]) + ("" if stat["std"] is None else f" ± {stat['std']:.3f}")


def _diff(c: dict | None, interval: str = "ci") -> str:
    if c is None:
        return "-"
    ci = c.get(interval)
    why = "one seed" if c.get("n_seeds", 1) < 2 else "one test problem"
    return f"{c['mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else f" ({why}: no interval)")


def seeds_finished(summary: dict) -> str:
    """The seeds each arm finished, "2", or "1/2" where an interrupted run left some arms short ("0": none)."""
    return "/".join(map(str, sorted({len(runs) for runs in summary["results"].values()}))) or "0"


def markdown(summary: dict) -> str:
    """results.md: the per-arm table (mean ± std over seeds), the paired comparisons and the costs."""
    cfg, seeds = summary["config"], summary["seeds"]
    swept = sorted({float(n.partition(".lr")[2]) for n in summary["arms"] if ".lr" in n})
    flags = train.TrainConfig(**{k: v for k, v in cfg.items() if k in train.TrainConfig.__dataclass_fields__})
    stage2_lr = ", ".join(f"{lr:g}" for lr in swept) or f"{train.stage2_peak_lr(flags):g}"  # not the experiment's own
    n_test = {r["n"] for runs in summary["results"].values() for r in runs}
    lines = [f"E1 = {cfg['max_iters']} steps, E2 = {cfg['stage2_iters']} steps, lr {cfg['lr']:g} (stage 2: "
             f"{stage2_lr}), λ = {cfg['key_weight']:g}, batch {cfg['batch_size']}x{cfg['grad_accum']}, "
             f"seeds {', '.join(map(str, seeds))}, {'/'.join(map(str, sorted(n_test))) or '?'} test problems per seed"
             + ("" if summary["complete"] else " (incomplete run)")
             + ("; " + runtime.MACHINE_LINE.format(**summary["machine"]) if summary.get("machine") else ""), "",
             "| arm | training | Acc | Fmt | Composite | val Acc | train s (last stage) | train s (all stages) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, agg in summary["aggregates"].items():
        about = summary["arms"][name]["about"]
        lines.append(f"| {name} | {about} | {_mean_std(agg['acc'])} | {_mean_std(agg['fmt'])} | "
                     f"{_mean_std(agg['composite'])} | {_mean_std(agg.get('val_acc', {'mean': None}))} | "
                     f"{agg['last_stage_seconds']['mean']:.0f} | "
                     f"{agg['train_seconds']['mean']:.0f} |")
    lines += ["", f"Mean ± sample standard deviation over {seeds_finished(summary)} seed(s); Fmt is undefined for "
                  "the untagged arm. val Acc: greedy, on --val_acc_n validation prompts after the last step. Times "
                  "are wall-clock seconds of training (mean over seeds), without evaluation."]
    reasoned = {n: a for n, a in summary["aggregates"].items() if a.get("reasoning", {}).get("mean") is not None}
    if reasoned:
        lines += ["", "| arm | reasoning right | Acc, reasoning right | Acc, reasoning wrong |", "| --- " * 4 + "|"]
        lines += [f"| {n} | " + " | ".join(_mean_std(a[k]) for k in REASONING) + " |" for n, a in reasoned.items()]
        lines += ["", "Reasoning right: the share of test responses whose reasoning is their problem's worked "
                      "solution, character for character (a synthetic problem has one right chain, the one trained "
                      "on); then Acc among those responses and among the others (mean over the seeds that have "
                      "some). Mean ± sample std over seeds."]
    if summary.get("picked"):
        val = {n: a["val_acc"]["mean"] for n, a in summary["aggregates"].items() if ".lr" in n and "val_acc" in a}
        tied = {arm: sum(n.partition(".lr")[0] == arm and v is not None and abs(v - val[name]) <= 1e-9  # as pick's
                         for n, v in val.items()) > 1 for arm, name in summary["picked"].items()}
        lines += ["", "Picked by validation Acc (never the test set): " + ", ".join(
            f"{arm} -> {name}" + " (tied with another lr: the first listed)" * tied[arm]
            for arm, name in summary["picked"].items())]
    if summary["comparisons"]:
        metrics = {"acc": "ΔAcc", "composite": "ΔComposite", "reasoning": "ΔReasoning right"}
        if not any("reasoning" in c for c in summary["comparisons"].values()):  # real data: not scored
            del metrics["reasoning"]
        header = ["comparison", *(f"{m} [95% CI]" for m in metrics.values()), "ΔAcc per seed",
                  "ΔAcc [seeds and problems]", "ΔAcc [problems only]"]
        lines += ["", "| " + " | ".join(header) + " |", "| --- " * len(header) + "|"]
        for name, c in summary["comparisons"].items():
            per_seed = ", ".join(f"{d:+.3f}" for d in c["acc"]["per_seed"])
            cells = [name, *(_diff(c.get(m)) for m in metrics), per_seed,
                     *(_diff(c.get("acc"), interval) for interval in ("ci_both", "ci_items"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Differences are means over seeds and test problems. The 95% CI is a t-interval over the "
                      "per-seed differences: it covers seed-to-seed variation on these test problems (the same for "
                      "every seed), not which problems were drawn. [seeds and problems] covers both (the "
                      "problems' share of the variance added; the seeds' degrees of freedom). The last "
                      f"column resamples test problems only ({summary['n_boot']} paired bootstrap resamples), "
                      "ignoring seeds: too narrow when seeds disagree, shown for comparison."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, rows: list[dict], out_dir: str) -> list[str]:
    """val_loss.png and accuracy.png; returns the files written, or [] when matplotlib is missing."""
    plt = plots.pyplot()
    if plt is None:
        return []
    from matplotlib import ticker
    written = []
    curves = _val_curves(rows)
    picked = summary.get("picked") or {}
    pair = [a for a in (picked.get(arm, arm) for arm in SWEPT) if a in curves]  # each starts with sft_tag's curve
    panels = [("thinking", "validation loss on thinking tokens"), ("key", "validation loss on key tokens")]
    panels += [("acc", "greedy validation Acc")] if pair and curves[pair[0]].get("acc") else []
    if pair:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharex=True)
        for ax, (role, title) in zip(axes, panels):
            for arm in pair:
                steps, values = curves[arm][role]
                ax.plot(steps, values, marker=".", label=arm)
            ax.axvline(summary["config"]["max_iters"], color="grey", linestyle=":", linewidth=1)
            ax.set(title=title, xlabel="step (stage 2 continues after E1)")
            if role == "acc":
                ax.set(ylabel="fraction of validation prompts", ylim=(0, 1))
                ax.legend()
                continue
            ax.set(ylabel="loss (nats/token, log scale)", yscale="log")
            # Plain numbers (0.1, 1) rather than 10^-1, 10^0; of the minor ticks only 2s and 5s are labelled.
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(ticker.FuncFormatter(
                lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "25" else ""))
            ax.legend()
        written.append(plots.save(fig, ckpts.owned_path(out_dir, "val_loss.png")))
    names = list(summary["aggregates"])
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names)), 4))
    x = np.arange(len(names))
    for i, metric in enumerate(("acc", "fmt")):
        stats = [summary["aggregates"][n][metric] for n in names]
        means = [np.nan if s["mean"] is None else s["mean"] for s in stats]
        errors = [0 if s["std"] is None else s["std"] for s in stats]
        ax.bar(x + (i - 0.5) * 0.4, means, 0.4, yerr=errors, capsize=3, label=metric.capitalize())
    ax.set_xticks(x, names, rotation=20)
    ax.set(ylim=(0, 1.05), ylabel="fraction of test problems",
           title=f"Acc and Fmt per arm (mean ± std over {seeds_finished(summary)} seeds)")
    ax.legend()
    written.append(plots.save(fig, ckpts.owned_path(out_dir, "accuracy.png")))
    return written


def _val_curves(rows: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Per arm, per role: (global steps, mean over seeds of the validation loss). An arm's rows cover
    all its stages, shared ones included, so a two-stage arm reads as one line."""
    by_arm: dict[str, dict[int, list[dict]]] = {}
    for row in rows:
        if "val_key" in row:
            by_arm.setdefault(row["arm"], {}).setdefault(row["global_step"], []).append(row)
    curves = {}
    for arm, points in by_arm.items():
        steps = sorted(points)
        curves[arm] = {role: (steps, [float(np.mean([r[f"val_{role}"] for r in points[s]])) for s in steps])
                       for role in ("thinking", "key", "acc")
                       if all(r.get(f"val_{role}") is not None for s in steps for r in points[s])}
    return curves


# ---------------------------------------------------------------------------------------------
# Command line

def build_parser():
    """train.py's flags (with defaults sized for this experiment) plus the experiment's own."""
    parser = train.build_parser(__doc__)
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma-separated arms to run, of {','.join(ARM_NAMES)} (default: "
                             f"{','.join(DEFAULT_ARMS)}, near 30 minutes on 2 CPU cores); stages that arms share "
                             "(sft_tag's, which sftkey_tag, sftsft_tag and sftdft_tag continue) are trained once")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds: --seed, --seed+1, ... (default: 3)")
    parser.add_argument("--e1", dest="max_iters", type=int, help="E1: steps of the first stage (= --max_iters)")
    parser.add_argument("--e2", dest="stage2_iters", type=int, help="E2: steps of stage 2 (= --stage2_iters)")
    parser.add_argument("--lam", dest="key_weight", type=float,
                        help="λ: key-token loss weight of the weighted arm (= --key_weight)")
    parser.add_argument("--stage2_lrs", default="", help="a sweep: comma-separated stage-2 peak lrs (e.g. "
                        "1e-5,3e-5,1e-4) at which each of sftkey_tag, sftsft_tag and sftdft_tag in --arms is trained "
                        "from the same stage 1; each arm's lr is picked by validation Acc, then compared on the test")
    parser.add_argument("--n_boot", type=int, default=10_000, help="bootstrap resamples (default: 10000)")
    parser.add_argument("--plot_only", action="store_true", help="train nothing: redraw the plots from the "
                        "results.json and loss_log.jsonl already in --out_dir (after pip install matplotlib)")
    parser.add_argument("--save_ckpt", action="store_true", help="write every arm's final weights to "
                        "OUT_DIR/seedS/ARM/ckpt.pt (default: keep nothing but the results)")
    # E1 and E2 are train.py's stage budgets, so an arm here is the default run's; see the README.
    parser.set_defaults(out_dir="out/experiment", key_weight=5.0, eval_interval=100,
                        log_interval=100)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[train.TrainConfig, dict]:
    """(train.py's config, the experiment's own settings: names, n_seeds, n_boot, save_ckpt)."""
    args = runtime.parse_flags(build_parser(), argv)
    names = [n.strip() for n in args.pop("arms").split(",") if n.strip()]
    try:  # "1e-5," or "," is refused too, not read as no sweep
        lrs = [float(v) for v in text.split(",")] if (text := args.pop("stage2_lrs")).strip() else []
    except ValueError:
        raise ValueError("--stage2_lrs: give numbers separated by commas, e.g. 1e-5,3e-5,1e-4") from None
    if lrs and (args["stage2_lr"] or not all(0 < v < math.inf for v in lrs) or len(set(lrs)) < len(lrs)):
        raise ValueError("--stage2_lrs: give distinct finite numbers > 0, and no --stage2_lr beside them")
    if lrs and (args["val_acc_n"] < 1 or not set(SWEPT) & set(names)):
        raise ValueError(f"--stage2_lrs trains {', '.join(SWEPT)} at each lr and picks by validation Acc: give one "
                         f"of them in --arms, and --val_acc_n >= 1")
    own = {"names": names, "n_seeds": args.pop("seeds"), "n_boot": args.pop("n_boot"),
           "save_ckpt": args.pop("save_ckpt"), "plot_only": args.pop("plot_only")}
    cfg, defaults = train.TrainConfig(**args), train.TrainConfig()
    for flag, (_, _, use) in runtime.FLAGS.items():  # before check_config, which would read them as the user's
        if use not in ("all", "arm") and getattr(cfg, flag) != getattr(defaults, flag):
            why = "the arms set the loss and the layout themselves" if use == "set" else use
            raise ValueError(f"--{flag} does not apply to the experiment: {why}")
    runtime.check_config(cfg)  # train.py's flag checks, stage 2's learning rate among them
    if (cfg.data and not cfg.eval_data) or (not cfg.data and cfg.n_test < 1):  # train.py would train, not score
        raise ValueError("the arms are compared on a test set: --data needs --eval_data, the synthetic task "
                         "--n_test >= 1")
    unknown = [n for n in names if n not in ARM_NAMES]
    if unknown:
        raise ValueError(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARM_NAMES)}")
    if min(own["n_seeds"], own["n_boot"], cfg.max_iters, cfg.stage2_iters) < 1:
        raise ValueError("--seeds, --n_boot, --e1 and --e2 must all be at least 1")
    if too_many := [f"--{flag} {own[key]}: at most {most}" for flag, key, most in (
            ("seeds", "n_seeds", 1000), ("n_boot", "n_boot", 10 ** 7)) if own[key] > most]:  # never ending, too large
        raise ValueError("; ".join(too_many))
    if not names:
        raise ValueError("--arms: no arm given")
    own["names"] = [n for n in ARM_NAMES if n in names for n in ([variant(n, v) for v in lrs] if lrs and n in SWEPT
                                                                   else [n])]
    return cfg, own


def replot(out_dir: str) -> list[str]:
    """The plots of a finished run, from the files it wrote (regular files only, as every input)."""
    summary = D.read_input(ckpts.owned_path(out_dir, "results.json"), "--plot_only")
    log = D.read_input(ckpts.owned_path(out_dir, "loss_log.jsonl"), "--plot_only")
    refusal = f"--plot_only {out_dir}: results.json and loss_log.jsonl there are not an experiment's"
    for name in ("val_loss.png", "accuracy.png"):  # first: a link there is refused as such, not blamed on the files
        ckpts.owned_path(out_dir, name)
    try:
        summary, rows = json.loads(summary), [json.loads(line) for line in log.splitlines()]
        if not (isinstance(summary, dict) and all(isinstance(summary.get(k), kind) for k, kind in (
                ("config", dict), ("seeds", list), ("aggregates", dict))) and all(isinstance(r, dict) for r in rows)):
            raise ValueError("not the layout experiment.py writes")  # refused with or without matplotlib
        return plot(summary, rows, out_dir)
    except (ValueError, LookupError, TypeError, AttributeError) as err:  # an edited file, deeper down: one line
        raise ValueError(f"{refusal} ({type(err).__name__}: {err})") from None


def run_experiment(cfg: train.TrainConfig, names: list[str], n_seeds: int = 3, n_boot: int = 10_000,
                   save_ckpt: bool = False, plot_only: bool = False) -> dict | None:
    """Every requested arm at every seed; writes and returns the summary.
    With `plot_only`, only redraws the plots of the run already in cfg.out_dir."""
    if plot_only:
        stop = runtime.StopSignal("a plot is whole or not written; run --plot_only again")  # no temporary left
        with stop, ckpts.FolderLock(cfg.out_dir) as lock:  # not from the files of a run still writing them
            if os.path.isdir(cfg.out_dir):  # else replot names the missing file, and no folder is made
                lock.acquire()
            images = replot(cfg.out_dir)
        print("plots: " + ", ".join(images) if images else
              "no plots: matplotlib is not installed (pip install matplotlib)")
        return None
    run_names = sorted(dict.fromkeys(names), key=lambda n: ARM_NAMES.index(n.partition(".lr")[0]))  # each once
    cfg, device, dtype = runtime.set_up_device(cfg)  # as train.py: --dtype auto resolved, attention off cuDNN's
    inputs = ckpts.read_inputs(cfg)  # every input file read once, for every arm and seed
    enc = D.get_encoding(cfg.encoding, inputs.raw.get("encoding"))
    if inputs.init:  # an --init_from of another shape or encoding is named before anything is printed or written
        ckpts.check_shape(inputs.init, cfg.init_from, ckpts.model_config(cfg, enc), cfg.encoding, enc.n_vocab)
    seeds = [cfg.seed + k for k in range(n_seeds)]
    machine = runtime.machine(device, dtype)  # results.json records it: another CPU or thread count draws other numbers
    recorder = Recorder(cfg, run_names, seeds, n_boot, inputs.origin[0], machine)
    print(f"arms {', '.join(run_names)} | seeds {', '.join(map(str, seeds))} | E1 {cfg.max_iters} | E2 "
          f"{cfg.stage2_iters} | device {device} | " + runtime.MACHINE_LINE.format(**machine), flush=True)
    for name in run_names:
        print(f"  {name}: " + " -> ".join(f"{s['name']} (weights {','.join(f'{w:g}' for w in s['weights'])}"
                                          f"{' x probability (DFT)' * s['dft']}, {s['iters']} steps, peak lr "
                                          f"{s['lr']:g})" for s in recorder.stages[name]))
    layouts = layout_data(cfg, run_names, enc, inputs.raw)  # bad input: here, before anything is written
    for tagged, sets in layouts.items():  # what each layout trains on (--seed's split)
        print(f"  {'tagged' if tagged else 'untagged'} layout: " + runtime.format_summary(sets[0].summary))
    test = next(iter(layouts.values()))[2]  # the same in both layouts
    print("  " + runtime.test_line([s for sets in layouts.values() for s in sets[:2]], test), flush=True)
    dropped = {t: sum(s.summary.get("dropped_in_other_layout", 0) for s in sets[:2]) for t, sets in layouts.items()}
    if any(dropped.values()):  # then both layouts are used
        print(f"note: training and validation examples too long for --block_size {cfg.block_size} in one layout are "
              f"dropped from the other too ({dropped[True]} too long only untagged, {dropped[False]} only tagged), "
              f"so every arm trains on the same examples", flush=True)
    plan = [(name,) for name in ckpts.EXPERIMENT_FILES] + [(f"seed{s}", n, ckpts.CKPT_NAME) for s in seeds
                                                           for n in run_names if save_ckpt]
    finished = 'an arm not finished is lost; the arms finished so far are in --out_dir (results.json: not "complete")'
    folder = ckpts.RunFolder(cfg.out_dir, cfg.overwrite, resume=False, resumable=False, flags=vars(cfg))
    with runtime.StopSignal(finished) as stop, folder:
        folder.take(plan)  # one run per folder: a second one, or another run's files, refused
        for seed in seeds:
            run_seed(dataclasses.replace(cfg, seed=seed), run_names, enc, device, dtype, recorder.add, save_ckpt,
                     inputs, stop)
        summary = recorder.write(complete=True)
        stop.after = "every arm finished and is in --out_dir; add --plot_only to this command to draw the plots"
        images = plot(summary, recorder.rows, cfg.out_dir)  # in the folder still held: its files are this run's
    print("\n" + markdown(summary))
    if images:
        print("plots: " + ", ".join(images))
    else:
        print("no plots: matplotlib is not installed (pip install matplotlib, then add --plot_only to "
              "this command to draw them from the files written)")
    print(f"results: {os.path.join(cfg.out_dir, 'results.md')}, results.json, loss_log.jsonl")
    return summary


def main(argv: list[str] | None = None) -> None:
    """Errors and stops in one line each (runtime.command); after a stop the files in --out_dir hold
    every arm finished so far ("complete": false)."""
    def work() -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would run the whole experiment, in one folder
            raise ValueError("experiment.py runs in one process, not under torchrun (train.py does DDP)")
        cfg, own = parse_args(argv)
        run_experiment(cfg, **own)
    runtime.command(work)


if __name__ == "__main__":
    main()
