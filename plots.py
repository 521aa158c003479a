"""Pictures of runs, drawn from their logs: `python plots.py` for train.py's `log.jsonl` (while a run trains, or
after), and the helpers experiment.py draws its figures with. matplotlib is optional: only drawing needs it.

    python plots.py out/log.jsonl                              # writes out/loss.png
    python plots.py runs/a/log.jsonl runs/b/log.jsonl -o a_vs_b.png
"""
from __future__ import annotations

if __name__ == "__main__":
    import startup  # noqa: F401  (first, before torch loads: a stop signal now ends in one line)

import argparse
import json
import os

import checkpoints as ckpts
import data as D
import runtime


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


PLOTTED = ("loss", "val_thinking", "val_key", "val_acc")  # the numbers drawn from a row


def run_plot(runs: list[dict] | dict[str, list[dict]], path: str) -> str | None:
    """loss.png of train.py runs (one run's rows, or rows by run label): training loss and validation loss per role
    (log scale), and validation Acc when measured, on one step axis across the stages, each stage's start marked.
    One colour per run when there are several. None without matplotlib or rows to draw."""
    plt = pyplot()
    runs = {label: [r for r in rows if "step" in r and "stage" in r]
            for label, rows in (runs if isinstance(runs, dict) else {"": runs}).items()}
    if plt is None or not any(runs.values()):
        return None
    has_acc = any(r.get("val_acc") is not None for rows in runs.values() for r in rows)
    fig, axes = plt.subplots(1, 1 + has_acc, figsize=(6 + 4 * has_acc, 4), squeeze=False)
    loss_ax, starts = axes[0][0], {}
    for k, (label, rows) in enumerate(runs.items()):
        steps, colour = global_steps(rows), {"color": f"C{k}"} if len(runs) > 1 else {}
        for key, name, style, dft in (("loss", "training loss", "-", False),
                                      ("loss", "training loss: DFT's objective, p x cross-entropy", "-.", True),
                                      ("val_thinking", "validation: thinking", "--", False),
                                      ("val_key", "validation: key", ":", False)):
            points = [(s, r[key]) for s, r in zip(steps, rows) if r.get(key) is not None and r.get("dft", False) == dft]
            if points:
                loss_ax.plot(*zip(*points), linestyle=style, marker="." if key != "loss" else None,
                             label=f"{label}: {name}" if label else name, **colour)
        points = [(s, r["val_acc"]) for s, r in zip(steps, rows) if r.get("val_acc") is not None]
        if points:
            axes[0][1].plot(*zip(*points), marker=".", label=label or None, **(colour or {"color": "C3"}))
        first = {}
        for s, r in zip(steps, rows):
            first.setdefault(r["stage"], s)
        for start in first.items():  # a start several runs share is grey
            starts[start] = "grey" if start in starts else colour.get("color", "grey")
    loss_ax.set(yscale="log", xlabel="step (all stages)", ylabel="loss (nats/token)", title="loss")
    if has_acc:
        axes[0][1].set(ylim=(0, 1), xlabel="step (all stages)", ylabel="fraction of validation prompts",
                       title="greedy validation Acc")
        if len(runs) > 1:
            axes[0][1].legend(fontsize=8)
    for ax in axes[0]:
        for (stage, start), colour in starts.items():
            if start > 0:  # the first stage starts the axis
                ax.axvline(start, color=colour, linestyle=":", linewidth=1)
                ax.annotate(stage, (start, 1), xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=8)
    loss_ax.legend(fontsize=8 if len(runs) > 1 else None)
    return save(fig, path)


def _number(value, *kinds: type) -> bool:
    """A JSON number matplotlib can draw: a float, or an int below 2**63 (a larger one overflows its floats)."""
    return type(value) in (kinds or (int, float)) and (type(value) is float or abs(value) < 2 ** 63)


def read_log(path: str) -> list[dict]:
    """The rows of a train.py log.jsonl; text after the last newline is a row still being written, left out."""
    try:
        lines = D.read_input(path, "log").decode("utf-8").split("\n")[:-1]
    except UnicodeDecodeError as err:
        raise ValueError(f"log {path}: not UTF-8 text ({err})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(row := json.loads(line))
        except ValueError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("stage", ""), str) and _number(row.get("step", 0), int)
                and row.get("step", 0) >= 0 and all(row.get(k) is None or _number(row[k]) for k in PLOTTED)):
            raise ValueError(f"{path}:{number}: not a row of a train.py log (one JSON object a line: a stage name, "
                             f"a whole step, numbers)")
        if "arm" in row:
            raise ValueError(f"{path}:{number}: a row of an experiment's log; its figures are drawn by "
                             f"python experiment.py --plot_only --out_dir {os.path.dirname(path) or '.'}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="train.py logs (OUT_DIR/log.jsonl), of finished runs or of runs still "
                        "training; several are drawn on one figure, each labelled by its folder")
    parser.add_argument("-o", "--out", default="", help="the PNG to write, replaced if it exists (default, for "
                        "one log: loss.png beside it)")
    args = parser.parse_args(argv)

    def draw() -> None:
        logs, out = args.logs, args.out or os.path.join(os.path.dirname(args.logs[0]), "loss.png")
        if len(logs) > 1 and not args.out:
            raise ValueError("several logs are drawn on one figure: name it with -o")
        runs = {log: read_log(log) for log in logs}  # input errors first, with or without matplotlib
        if len({(s.st_dev, s.st_ino) for s in map(os.stat, logs)}) < len(logs):  # by any path, or a hard link
            raise ValueError("a log is given twice")
        if not out.endswith(".png") or os.path.lexists(out) and not os.path.isfile(out) \
                or any(os.path.samefile(out, log) for log in logs if os.path.exists(out)) \
                or not os.path.isdir(os.path.dirname(out) or "."):
            raise ValueError(f"-o {out}: give a .png file in an existing folder (replaced if it is one)")
        if pyplot() is None:
            raise ValueError("drawing needs matplotlib: pip install matplotlib")
        labels = [os.path.dirname(log) or log for log in logs] if len(logs) > 1 else [""]
        if run_plot(dict(zip(labels if len(set(labels)) == len(labels) else logs, runs.values())), out) is None:
            raise ValueError(f"nothing to draw yet: no training rows in {', '.join(logs)}")
        print(f"wrote {out}")
    with runtime.StopSignal("the plot is whole or not written"):  # SIGTERM too: no temporary left, exit 130
        runtime.command(draw)  # bad input: one line, exit 2


if __name__ == "__main__":
    main()
