"""A run's live log (out_dir/log.jsonl), plots.py drawing it, and what they must not break: checkpoints loadable with
weights_only=True, --resume, --overwrite, no writing through a symbolic link; --show_roles before training.

One finished run and one interrupted run are made once for the module (about 5 s each on one CPU thread)."""
import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import checkpoints
import data as D
import plots
import train
from conftest import run_cli

TINY = ["--n_train", "200", "--n_test", "4", "--n_val", "20", "--max_iters", "6", "--stage2_iters", "3",
        "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--batch_size", "8", "--block_size", "64",
        "--device", "cpu", "--dtype", "float32", "--eval_interval", "3", "--log_interval", "2",
        "--val_acc_n", "2", "--warmup_iters", "1", "--ckpt_interval", "2"]
STAGES = ("sft_tag", "sftkey_tag")
PNG = b"\x89PNG\r\n\x1a\n"


class Killed(RuntimeError):
    """Stands for a kill -9: the run stops where it is, nothing more is written."""


def flags(out_dir, *extra: str) -> list[str]:
    return [*TINY, "--out_dir", str(out_dir), *extra]


def rows_of(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n"), "every row is a whole line"
    rows = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(r, dict) for r in rows)
    return rows


def main(args: list[str], capsys) -> tuple[int, str, str]:
    return run_cli(train.main, args, capsys)


def no_training(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(train, "train", refuse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """A finished two-stage run with --show_roles 1 (stdout kept), and what log.jsonl held at every after_step."""
    out = tmp_path_factory.mktemp("finished") / "run"
    snapshots = []
    original = checkpoints.StageCheckpoint.after_step

    def after_step(self, done, iters, model, optimizer):  # mid-training: what is on disk already?
        path = out / checkpoints.LOG_NAME
        snapshots.append({"stage": self.stage, "done": done, "in_memory": [dict(r) for r in self.log],
                          "on_disk": rows_of(path) if path.exists() else None})
        return original(self, done, iters, model, optimizer)

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(checkpoints.StageCheckpoint, "after_step", after_step)
        summary = train.run(train.parse_args(flags(out, "--show_roles", "1")))
    return {"out": out, "summary": summary, "snapshots": snapshots, "stdout": stdout.getvalue(),
            "results": json.loads((out / checkpoints.RESULTS_NAME).read_text())}


# ---------------------------------------------------------------------------------------------
# log.jsonl: one JSON object a line, the rows of results.json's log, a results row after each stage

def test_log_jsonl_holds_results_log_rows_in_order_and_a_results_row_after_each_stage(finished):
    rows = rows_of(finished["out"] / "log.jsonl")
    results = finished["results"]
    assert results["log"], "the run logged rows"
    expected = []
    for stage in STAGES:
        expected += [r for r in results["log"] if r["stage"] == stage]
        r = results["results"][stage]
        expected.append({"stage": stage, "results": {"acc": r["acc"], "fmt": r["fmt"], "n": r["n"]}})
    assert rows == expected
    # the log itself is ordered by stage, then step
    assert [r for r in rows if "results" not in r] == results["log"]
    # both kinds of rows are there: training lines (loss, lr) and validation lines (val_thinking, val_key)
    for stage in STAGES:
        assert any("loss" in r and "lr" in r for r in rows if r["stage"] == stage), stage
        assert any("val_thinking" in r and "val_key" in r for r in rows if r["stage"] == stage), stage
    assert [r["results"]["n"] for r in rows if "results" in r] == [4, 4]


def test_log_rows_are_on_disk_as_they_are_logged(finished):
    snapshots = finished["snapshots"]
    assert [(s["stage"], s["done"]) for s in snapshots] == [("sft_tag", d) for d in range(1, 7)] + \
        [("sftkey_tag", d) for d in range(1, 4)]
    first_rows = {}
    for snap in snapshots:
        assert snap["on_disk"] is not None, f"no log.jsonl yet at {snap['stage']} step {snap['done']}"
        # exactly the rows logged so far: a crash at this point would lose none
        assert [r for r in snap["on_disk"] if "results" not in r] == snap["in_memory"], snap["done"]
        finished_stages = [r["stage"] for r in snap["on_disk"] if "results" in r]
        assert finished_stages == ([] if snap["stage"] == "sft_tag" else ["sft_tag"])
        first_rows.setdefault(snap["stage"], len(snap["on_disk"]))
    # the file grows during the stage, not only at its end
    first = snapshots[0]["on_disk"]
    assert first and first[0]["stage"] == "sft_tag" and first[0]["step"] == 0  # step 0's rows, before step 1
    assert len(snapshots[-1]["on_disk"]) > len(snapshots[len(snapshots) // 2]["on_disk"]) > len(first)


def test_live_log_appends_each_row_and_notes_write_to_the_file_only(tmp_path):
    log = checkpoints.LiveLog(str(tmp_path))
    log.append({"stage": "a", "step": 0, "loss": 1.5})
    assert rows_of(tmp_path / "log.jsonl") == [{"stage": "a", "step": 0, "loss": 1.5}]
    log.note({"stage": "a", "results": {"acc": 0.5, "fmt": 1.0, "n": 2}})
    log.append({"stage": "b", "step": 0, "loss": 0.5})
    assert list(log) == [{"stage": "a", "step": 0, "loss": 1.5}, {"stage": "b", "step": 0, "loss": 0.5}]
    assert [r["stage"] for r in rows_of(tmp_path / "log.jsonl")] == ["a", "a", "b"]
    # without an out_dir (other ranks of a torchrun job) a plain list that writes nothing
    other = checkpoints.LiveLog(None)
    other.append({"stage": "a", "step": 0})
    assert other == [{"stage": "a", "step": 0}] and other.path is None


def test_live_log_never_writes_through_a_link_planted_after_it_was_made(tmp_path):
    out, target = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    target.write_text("precious\n")
    log = checkpoints.LiveLog(str(out))
    (out / "log.jsonl").symlink_to(target)
    with pytest.raises(OSError):
        log.append({"stage": "a", "step": 0})
    assert target.read_text() == "precious\n"


# ---------------------------------------------------------------------------------------------
# Checkpoints stay loadable with weights_only=True (regression: a LiveLog in them was refused)

def test_stage_checkpoints_load_with_weights_only_and_hold_the_log_as_a_plain_list(finished):
    log = finished["results"]["log"]
    for stage in STAGES:
        ckpt = torch.load(finished["out"] / stage / "ckpt.pt", map_location="cpu", weights_only=True)
        assert type(ckpt["log"]) is list, stage
        assert all(type(r) is dict for r in ckpt["log"])
        # a stage's final checkpoint holds the log up to its end
        upto = max(i for i, r in enumerate(log) if r["stage"] == stage) + 1
        assert ckpt["log"] == log[:upto], stage
        assert stage in ckpt["results"]
        checkpoints.read_checkpoint(str(finished["out"] / stage / "ckpt.pt"), None, "cpu")  # the project's reader


def test_resume_of_a_finished_run_skips_both_stages_and_adds_no_log_rows(finished, tmp_path, capsys, monkeypatch):
    out = shutil.copytree(finished["out"], tmp_path / "copy")
    before = (out / "log.jsonl").read_bytes()
    no_training(monkeypatch)
    code, stdout, err = main(flags(out, "--resume"), capsys)
    assert code == 0, err
    assert "resumed at step" not in stdout
    again = json.loads((out / "results.json").read_text())
    for stage in STAGES:
        assert again["results"][stage]["acc"] == finished["results"]["results"][stage]["acc"]
        assert again["results"][stage]["correct"] == finished["results"]["results"][stage]["correct"]
    assert again["log"] == finished["results"]["log"]
    assert (out / "log.jsonl").read_bytes() == before


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """The same flags as `finished`, killed while fetching stage 1's batch 5: the last checkpoint is at step 4."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    original = D.Batches.get

    def get(self, i, device, **split):
        if i == 5:
            raise Killed(f"killed while fetching batch {i}")
        return original(self, i, device, **split)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(D.Batches, "get", get)
        with pytest.raises(Killed):
            train.run(train.parse_args(flags(out)))
    return out


def test_an_interrupted_run_kept_every_row_and_its_checkpoint_loads_with_weights_only(interrupted):
    ckpt = torch.load(interrupted / "sft_tag" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4 and type(ckpt["log"]) is list
    rows = rows_of(interrupted / "log.jsonl")
    assert rows[:len(ckpt["log"])] == ckpt["log"]
    # step 4's training row came after the last checkpoint: the checkpoint lacks it, log.jsonl has it
    assert not any(r["step"] == 4 for r in ckpt["log"])
    assert [r["step"] for r in rows if "loss" in r] == [0, 2, 4]
    assert not (interrupted / "results.json").exists()


def test_resume_of_an_interrupted_run_says_where_and_ends_as_the_uninterrupted_run(interrupted, finished, tmp_path,
                                                                                      capsys):
    out = shutil.copytree(interrupted, tmp_path / "copy")
    code, stdout, err = main(flags(out, "--resume"), capsys)
    assert code == 0, err
    assert f"sft_tag: resumed at step 4 from {out / 'sft_tag' / 'ckpt.pt'}" in stdout
    assert "sftkey_tag: resumed" not in stdout  # stage 2 had not begun
    summary = json.loads((out / "results.json").read_text())
    key = lambda r: (r["stage"], r["step"], r.get("loss"), r.get("val_thinking"), r.get("val_key"))  # noqa: E731
    assert [key(r) for r in summary["log"]] == [key(r) for r in finished["results"]["log"]]
    for stage in STAGES:
        assert summary["results"][stage]["correct"] == finished["results"]["results"][stage]["correct"]
    # log.jsonl: row for row the uninterrupted run's; the killed run's step-4 row, logged after its last checkpoint,
    # went from the file as the resumed run logged that step again
    assert [same_row(r) for r in rows_of(out / "log.jsonl")] == [same_row(r) for r in rows_of(finished["out"] /
                                                                                            "log.jsonl")]
    assert [r for r in rows_of(out / "log.jsonl") if "results" not in r] == summary["log"]
    for stage in STAGES:
        ckpt = torch.load(out / stage / "ckpt.pt", map_location="cpu", weights_only=True)
        assert type(ckpt["log"]) is list and stage in ckpt["results"]


def test_a_log_the_user_cut_or_deleted_before_resuming_is_never_recorded_longer_than_it_is(tmp_path):
    """Found in review: with a cut pending, `written` gave the checkpoint's length even where the file was shorter,
    and a later resume then kept rows it should have cut."""
    log = checkpoints.LiveLog(str(tmp_path))
    log.append({"stage": "a", "step": 0})
    log.resume({"log": [], "log_bytes": 10 ** 6})
    assert log.written == (tmp_path / "log.jsonl").stat().st_size < 10 ** 6
    (tmp_path / "log.jsonl").unlink()
    assert log.written == 0


def same_row(row: dict) -> tuple:
    """What two runs of the same flags log alike (not their speed or times)."""
    return row["stage"], row.get("step"), row.get("loss"), row.get("val_thinking"), row.get("val_acc"), \
        json.dumps(row.get("results"))


@pytest.mark.parametrize("where", ["stage 2's first steps", "stage 2's last checkpoint"])
def test_a_run_killed_in_stage_2_resumes_to_the_uninterrupted_runs_log(finished, tmp_path, capsys, where):
    """Killed before stage 2's first checkpoint (the last one is stage 1's final one), or as stage 2's final one is
    written (after its rows): either way the rows after the last checkpoint go, and only they (both checkpoints
    are loaded on resuming: the later one decides where the file is cut)."""
    out, kill_batch = tmp_path / "run", 7 if where == "stage 2's first steps" else None
    original_get, original_save = D.Batches.get, checkpoints.StageCheckpoint.save

    def get(self, i, device, **split):
        if i == kill_batch:
            raise Killed(f"killed while fetching batch {i}")
        return original_get(self, i, device, **split)

    def save(self, step, model, optimizer, *finished):
        if kill_batch is None and self.stage == "sftkey_tag" and step == 3:
            raise Killed("killed as stage 2's final checkpoint was written")
        return original_save(self, step, model, optimizer, *finished)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(D.Batches, "get", get)
        mp.setattr(checkpoints.StageCheckpoint, "save", save)
        with pytest.raises(Killed):
            train.run(train.parse_args(flags(out)))
    killed = rows_of(out / "log.jsonl")
    assert any(r["stage"] == "sftkey_tag" for r in killed)  # stage 2 had logged rows
    code, _, err = main(flags(out, "--resume"), capsys)
    assert code == 0, err
    assert [same_row(r) for r in rows_of(out / "log.jsonl")] == [same_row(r) for r in rows_of(finished["out"] /
                                                                                            "log.jsonl")]


def test_restore_prints_the_step_it_resumes_at(tmp_path, capsys):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    saved = {"step": 7, "optimizer": optimizer.state_dict(), **checkpoints.rng_state()}
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = checkpoints.StageCheckpoint(str(tmp_path / "s" / "ckpt.pt"), train.TrainConfig(), "sft_tag", [], saved)
    assert ckpt.restore(fresh) == 7
    assert capsys.readouterr().out == f"sft_tag: resumed at step 7 from {tmp_path / 's' / 'ckpt.pt'}\n"
    assert fresh.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    # nothing saved: step 0, and nothing printed
    assert checkpoints.StageCheckpoint(None, train.TrainConfig(), "sft_tag", []).restore(fresh) == 0
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# Drawing: plots.py

def test_a_run_draws_nothing_itself_and_needs_no_matplotlib(finished, tmp_path, capsys, monkeypatch):
    assert not list(finished["out"].glob("*.png"))  # plots.py draws from log.jsonl
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert plots.pyplot() is None
    out = tmp_path / "bare"
    code, _, err = main(flags(out, "--max_iters", "3", "--stage2_iters", "1"), capsys)
    assert code == 0, err
    assert (out / "log.jsonl").exists() and (out / "results.json").exists()
    assert not (out / "loss.png").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".loss.png")], "a temporary was left"


def test_run_plot_draws_a_png_of_the_rows_or_nothing(tmp_path, monkeypatch):
    rows = [{"stage": "a", "step": 0, "loss": 2.0}, {"stage": "a", "step": 0, "val_thinking": 2.1, "val_key": 2.2,
                                                     "val_acc": 0.0},
            {"stage": "a", "results": {"acc": 0.0, "fmt": 1.0, "n": 3}}, {"stage": "b", "step": 0, "loss": 1.0}]
    assert plots.run_plot([{"stage": "a", "results": {}}], str(tmp_path / "none.png")) is None  # no step rows
    assert not (tmp_path / "none.png").exists()
    if importlib.util.find_spec("matplotlib") is not None:
        assert plots.run_plot(rows, str(tmp_path / "loss.png")) == str(tmp_path / "loss.png")
        assert (tmp_path / "loss.png").read_bytes().startswith(PNG)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plots.run_plot(rows, str(tmp_path / "other.png")) is None
    assert not (tmp_path / "other.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="draws with matplotlib (CI installs it)")
def test_a_dft_stages_training_loss_is_its_own_line_not_the_cross_entropys(tmp_path, monkeypatch):
    """Found in review: DFT's objective (p x cross-entropy, below 1/e) drawn as the training loss looked like a
    collapse of the loss at the stage boundary. Its rows carry "dft" (runtime.Meter.line) and get their own line."""
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or path)
    rows = [{"stage": "sft_tag", "step": k, "loss": 2.0 - k} for k in range(2)]
    rows += [{"stage": "sftdft_tag", "step": k, "loss": 0.1, "dft": True} for k in range(3)]
    plots.run_plot(rows, str(tmp_path / "loss.png"))
    lines = {line.get_label(): list(line.get_xdata()) for line in figures[0].axes[0].get_lines()}
    assert lines["training loss"] == [0, 1]
    assert lines["training loss: DFT's objective, p x cross-entropy"] == [2, 3, 4]

    rows = [{"stage": "a", "step": 0}, {"stage": "a", "step": 0}, {"stage": "a", "step": 2},
            {"stage": "a", "step": 5}, {"stage": "a", "step": 5},
            {"stage": "b", "step": 0}, {"stage": "b", "step": 2}, {"stage": "b", "step": 2},
            {"stage": "c", "step": 0}, {"stage": "c", "step": 1}]
    assert plots.global_steps(rows) == [0, 0, 2, 5, 5, 6, 8, 8, 9, 10]
    assert plots.global_steps([]) == []
    # the finished run's rows: stage 2's steps follow stage 1's (6 steps: 0..5)
    two = [{"stage": s, "step": k} for s, n in (("sft_tag", 6), ("sftkey_tag", 3)) for k in range(n)]
    assert plots.global_steps(two) == list(range(9))


def test_read_log_gives_a_runs_rows_and_leaves_out_a_row_still_being_written(finished, tmp_path):
    log = (finished["out"] / "log.jsonl").read_bytes()
    assert plots.read_log(str(finished["out"] / "log.jsonl")) == rows_of(finished["out"] / "log.jsonl")
    cut = log.index(b"\n", len(log) // 2) + 10  # a run appending a row as the file is read
    (tmp_path / "partial.jsonl").write_bytes(log[:cut])
    assert plots.read_log(str(tmp_path / "partial.jsonl")) == [json.loads(x) for x in log[:cut].split(b"\n")[:-1]]


@pytest.mark.parametrize("text, problem", [
    ('{"stage": "a", "step": 0}\n[1, 2]\n', "bad.jsonl:2: not a row of a train.py log"),
    ('{"stage": "a"}\nnot json\n{"stage": "a"}\n', "bad.jsonl:2: not a row of a train.py log"),
    ('{"arm": "sft_tag", "seed": 0, "stage": "sft_tag", "step": 0}\n', "bad.jsonl:1: a row of an experiment's log"),
    ('{"stage": "a", "step": "x"}\n', "bad.jsonl:1: not a row of a train.py log"),
    ('{"stage": "a", "step": 0, "loss": "low"}\n', "bad.jsonl:1: not a row of a train.py log"),
    ('{"stage": "a", "step": 0}\n{"stage": "a", "step": 1' + "0" * 400 + '}\n', "bad.jsonl:2: not a row"),  # overflowed
    ('{"stage": "a", "step": 0, "loss": 1' + "0" * 400 + '}\n', "bad.jsonl:1: not a row"),  # matplotlib's floats
    ('{"stage": "a", "step": -1}\n', "bad.jsonl:1: not a row of a train.py log"),
])
def test_plots_cli_names_the_file_and_line_of_a_bad_log_and_writes_nothing(tmp_path, capsys, text, problem):
    (tmp_path / "bad.jsonl").write_text(text)
    code, out, err = run_cli(plots.main, [str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "p.png")], capsys)
    assert code == 2 and out == "" and err.startswith("error: ") and problem in err and err.count("\n") == 1
    assert not (tmp_path / "p.png").exists()


def test_plots_cli_refuses_what_it_cannot_draw_in_one_line(finished, tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.jsonl").write_text('{"stage": "a", "results": {}}\n')
    for args, problem in [([str(tmp_path / "absent.jsonl")], "log " + str(tmp_path / "absent.jsonl") + ": no such"),
                          ([str(tmp_path)], "not a regular file"),
                          ([str(tmp_path / "empty.jsonl")], "nothing to draw yet")]:
        if "nothing" in problem and importlib.util.find_spec("matplotlib") is None:
            continue  # without matplotlib the next case says so first
        code, _, err = run_cli(plots.main, [*args, "-o", str(tmp_path / "p.png")], capsys)
        assert code == 2 and problem in err and err.count("\n") == 1, err
    log = str(finished["out"] / "log.jsonl")
    before = Path(log).read_bytes()
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "link.jsonl").symlink_to(log)
    os.link(log, tmp_path / "hard.jsonl")
    for args, problem in [([log, log, "-o", str(tmp_path / "p.png")], "a log is given twice"),
                          ([log, str(tmp_path / "link.jsonl"), "-o", str(tmp_path / "p.png")], "a log is given twice"),
                          ([log, str(tmp_path / "hard.jsonl"), "-o", str(tmp_path / "p.png")], "a log is given twice"),
                          ([log, log], "several logs are drawn on one figure: name it with -o"), ([log, "-o", log], "give a .png file"),
                          ([log, "-o", str(tmp_path / "p.jpg")], "give a .png file"),
                          ([log, "-o", str(tmp_path / "folder.png")], "give a .png file"),
                          ([log, "-o", str(tmp_path / "absent" / "p.png")], "in an existing folder")]:
        code, _, err = run_cli(plots.main, args, capsys)
        assert code == 2 and problem in err and err.count("\n") == 1, err
    assert Path(log).read_bytes() == before and not (tmp_path / "absent").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_cli(plots.main, [log, "-o", str(tmp_path / "p.png")], capsys)
    assert code == 2 and "drawing needs matplotlib" in err
    assert not (tmp_path / "p.png").exists()


def test_plots_cli_draws_one_run_now_and_several_runs_on_one_figure(finished, tmp_path, capsys, monkeypatch):
    (tmp_path / "run").mkdir()
    log = str(shutil.copy(finished["out"] / "log.jsonl", tmp_path / "run" / "log.jsonl"))
    monkeypatch.chdir(tmp_path)
    if importlib.util.find_spec("matplotlib") is None:  # optional for users (.ci/run installs it): one line then
        assert run_cli(plots.main, [log], capsys)[::2] == (2, "error: drawing needs matplotlib: pip install "
                                                              "matplotlib\n")
        return
    code, out, _ = run_cli(plots.main, [log], capsys)  # by default loss.png beside the log
    assert code == 0 and out == f"wrote {tmp_path / 'run' / 'loss.png'}\n"
    assert (tmp_path / "run" / "loss.png").read_bytes().startswith(PNG)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(log, other / "log.jsonl")
    drawn = {}
    monkeypatch.setattr(plots, "save", lambda fig, path: drawn.setdefault(path, fig) and path)
    code, out, _ = run_cli(plots.main, [log, str(other / "log.jsonl"), "-o", "both.png"], capsys)
    assert code == 0 and out == "wrote both.png\n"
    lines = drawn["both.png"].axes[0].get_lines()
    labels = [line.get_label() for line in lines]
    assert f"{other}: training loss" in labels and f"{tmp_path / 'run'}: validation: key" in labels
    assert {line.get_color() for line in lines if line.get_label().startswith(str(other))} == {"C1"}
    # each run's stage 2 is marked where it starts; a start both runs share once, in grey
    marks = [line for line in lines if line.get_linestyle() == ":" and line.get_label().startswith("_")]
    assert [(m.get_xdata()[0], m.get_color()) for m in marks] == [(6, "grey")]
    short = [r for r in plots.read_log(log) if r["stage"] == "sftkey_tag" or r.get("step", 0) < 3]  # stage 1: 0-2
    (other / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    code, _, _ = run_cli(plots.main, [log, str(other / "log.jsonl"), "-o", "both2.png"], capsys)
    marks = [line for line in drawn["both2.png"].axes[0].get_lines() if line.get_linestyle() == ":"
             and line.get_label().startswith("_")]
    assert code == 0 and sorted((m.get_xdata()[0], m.get_color()) for m in marks) == [(3, "C1"), (6, "C0")]


# ---------------------------------------------------------------------------------------------
# --overwrite, and symbolic links

def test_overwrite_deletes_the_earlier_log_so_the_new_log_holds_only_this_runs_rows(finished, tmp_path, capsys):
    out = shutil.copytree(finished["out"], tmp_path / "copy")
    (out / "loss.png").write_bytes(PNG)  # as `python plots.py` draws it: the earlier run's picture goes too
    code, _, err = main(flags(out, "--overwrite", "--max_iters", "4", "--stage2_iters", "2"), capsys)
    assert code == 0, err
    assert "--overwrite: deleted" in err and str(out / "log.jsonl") in err
    rows = rows_of(out / "log.jsonl")
    summary = json.loads((out / "results.json").read_text())
    assert [r for r in rows if "results" not in r] == summary["log"]
    assert [r["stage"] for r in rows if "results" in r] == list(STAGES)  # one results row per stage, not two
    # none of the earlier 6-step run's rows
    assert max(r["step"] for r in rows if r["stage"] == "sft_tag" and "step" in r) == 3
    assert not (out / "loss.png").exists() and str(out / "loss.png") in err


@pytest.mark.parametrize("extra", [(), ("--overwrite",), ("--resume",)], ids=["plain", "overwrite", "resume"])
@pytest.mark.parametrize("dangling", [False, True], ids=["to_a_file", "dangling"])
def test_a_symlinked_log_jsonl_is_refused_and_its_target_untouched(tmp_path, capsys, monkeypatch, extra, dangling):
    out, target = tmp_path / "out", tmp_path / "elsewhere" / "precious.jsonl"
    out.mkdir()
    target.parent.mkdir()
    if not dangling:
        target.write_text('{"precious": true}\n')
    (out / "log.jsonl").symlink_to(target)
    no_training(monkeypatch)
    code, _, err = main(flags(out, *extra), capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "log.jsonl" in err and "symbolic link" in err, err
    assert (out / "log.jsonl").is_symlink()  # not deleted (--overwrite) either
    if dangling:
        assert not target.exists(), "a file was created through the link"
    else:
        assert target.read_text() == '{"precious": true}\n'
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl"]


# ---------------------------------------------------------------------------------------------
# --show_roles

def test_show_roles_prints_the_viewer_and_each_stages_loss_before_training(finished):
    out = finished["stdout"]
    start = out.index("sft_tag step     0/")  # the first training line
    before = out[:start]
    for marker in ("[P:", "[T:", "[K:", "--- example 1 of ", "loss sft_tag ", "loss sftkey_tag "):
        assert marker in before, marker
    assert "--- example 2 of " not in out  # --show_roles 1: one example
    assert before.index("loss sft_tag ") < before.index("loss sftkey_tag ")
    assert "[K:<|endoftext|>]" in before  # end-of-text is a key token


def test_a_checkpoint_taken_with_an_empty_log_cuts_the_file_back_to_empty(tmp_path):
    """log_bytes 0 (a checkpoint written when log.jsonl was empty or deleted) is a cut like any other: the rows a
    killed run wrote after that checkpoint go as the resumed run's first row comes."""
    log = checkpoints.LiveLog(str(tmp_path))
    log.append({"stage": "a", "step": 0})  # the killed run's row, after its checkpoint
    log.resume({"log": [], "log_bytes": 0})
    assert log.written == 0
    log.append({"stage": "a", "step": 1})
    assert rows_of(tmp_path / "log.jsonl") == [{"stage": "a", "step": 1}]


@pytest.mark.skipif(not importlib.util.find_spec("matplotlib"), reason="needs matplotlib")
def test_plots_stopped_by_sigterm_while_writing_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    """Found by attack: SIGTERM (or SIGHUP) while plots.py wrote its PNG killed it with the partial temporary
    (`.loss.png.*.tmp`) left beside the log; Ctrl-C removed it. Now every stop signal does, one line, exit 130."""
    import signal

    from matplotlib.figure import Figure
    log = tmp_path / "log.jsonl"
    log.write_text('{"stage": "a", "step": 0, "loss": 2.0}\n{"stage": "a", "step": 1, "loss": 1.0}\n')
    savefig = Figure.savefig

    def signalled(fig, f, **kwargs):
        f.write(b"half a PNG")
        if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:  # else it would kill pytest as it killed plots.py
            os.kill(os.getpid(), signal.SIGTERM)
        savefig(fig, f, **kwargs)
    monkeypatch.setattr(Figure, "savefig", signalled)
    code, _, err = run_cli(plots.main, [str(log)], capsys)
    assert code == 130 and err.startswith("stopped: SIGTERM received") and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl"]
