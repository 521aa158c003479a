"""Pictures of a run: `loss.png` for train.py's log, and the helpers experiment.py draws its plots with.

matplotlib is optional: without it nothing is drawn and nothing fails (`pyplot` returns None).
"""
from __future__ import annotations

import checkpoints as ckpts


def pyplot():
    """matplotlib.pyplot drawing to files only, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, path: str) -> str:
    """Write `fig` as a PNG to `path` (atomically, as every file of a run) and close it."""
    fig.tight_layout()
    ckpts.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    pyplot().close(fig)
    return path


def global_steps(rows: list[dict]) -> list[int]:
    """Each row's step counted from the start of the run: a stage's steps follow the previous stage's last one."""
    offsets, last, out = {}, {}, []
    for row in rows:
        if row["stage"] not in offsets:
            offsets[row["stage"]] = sum(last[s] + 1 for s in offsets)
        last[row["stage"]] = max(last.get(row["stage"], 0), row["step"])
        out.append(offsets[row["stage"]] + row["step"])
    return out


def run_plot(rows: list[dict], path: str) -> str | None:
    """loss.png of a train.py run: training loss and validation loss per role (log scale), and validation Acc
    when measured, on one step axis across the stages, each stage's start marked. None without matplotlib."""
    plt = pyplot()
    rows = [r for r in rows if "step" in r and "stage" in r]
    if plt is None or not rows:
        return None
    steps = global_steps(rows)
    has_acc = any(r.get("val_acc") is not None for r in rows)
    fig, axes = plt.subplots(1, 1 + has_acc, figsize=(6 + 4 * has_acc, 4), squeeze=False)
    loss_ax = axes[0][0]
    for key, label in (("loss", "training loss"), ("val_thinking", "validation: thinking"),
                       ("val_key", "validation: key")):
        points = [(s, r[key]) for s, r in zip(steps, rows) if r.get(key) is not None]
        if points:
            loss_ax.plot(*zip(*points), marker="." if key != "loss" else None, label=label)
    loss_ax.set(yscale="log", xlabel="step (all stages)", ylabel="loss (nats/token)", title="loss")
    if has_acc:
        points = [(s, r["val_acc"]) for s, r in zip(steps, rows) if r.get("val_acc") is not None]
        axes[0][1].plot(*zip(*points), marker=".", color="C3")
        axes[0][1].set(ylim=(0, 1), xlabel="step (all stages)", ylabel="fraction of validation prompts",
                       title="greedy validation Acc")
    starts = {}
    for s, r in zip(steps, rows):
        starts.setdefault(r["stage"], s)
    for ax in axes[0]:
        for stage, start in list(starts.items())[1:]:
            ax.axvline(start, color="grey", linestyle=":", linewidth=1)
            ax.annotate(stage, (start, 1), xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=8)
    loss_ax.legend()
    return save(fig, path)
