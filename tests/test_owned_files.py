"""What a run reads and what it may write: each input is read once (later edits cannot reach the run
or its resumption), every path written or deleted is one the run named under --out_dir, and no
file, signal or flag ends a run with a wrong result and exit 0 or a traceback."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import data as D
import experiment
import plots
import runtime
import train
from conftest import for_data
from model import GPT, GPTConfig
from test_run_folder import Killed, digests, flags, main, no_training, one_line_error, write_data

ROOT = Path(__file__).resolve().parent.parent


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler of its own for `sig` (Linux: the SigCgt mask in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(status.split("SigCgt:")[1].split()[0], 16) >> (sig - 1) & 1)


def batches_hook(monkeypatch, actions: dict) -> None:
    """At batch index i of the data stream, run actions[i] (which may raise) before fetching it."""
    original = D.Batches.get

    def get(self, i, device, **split):
        if i in actions:
            actions[i]()
        return original(self, i, device, **split)
    monkeypatch.setattr(D.Batches, "get", get)


def kill() -> None:
    raise Killed("killed")


# ---------------------------------------------------------------------------------------------
# Every input is read once

def test_data_rewritten_while_training_is_not_resumed_into(tmp_path, capsys, monkeypatch):
    """The checkpoint records the sha256 of the bytes trained on, not of the file at writing time: a
    --data rewritten by another process mid-run makes --resume refuse, not mix the two files."""
    data = write_data(tmp_path / "data.jsonl")
    trained_on = sha256(data)
    with pytest.MonkeyPatch.context() as mp:
        batches_hook(mp, {5: lambda: write_data(data, offset=1), 9: kill})
        with pytest.raises(Killed):
            train.run(train.parse_args(flags(tmp_path / "out", data)))
    ckpt = torch.load(tmp_path / "out" / "sft_tag" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 8 and ckpt["file_hashes"]["--data"] == trained_on != sha256(data)
    no_training(monkeypatch)
    code, err = main(flags(tmp_path / "out", data, "--resume"), capsys)
    one_line_error(code, err, f"--data {data}: other contents (sha256 {trained_on[:12]}")


def test_init_from_replaced_after_loading_is_not_resumed_from(tmp_path, capsys, monkeypatch):
    """A stage run by hand from a checkpoint that is then replaced (its stage-1 run still writing):
    --resume compares the bytes it started from and refuses, rather than re-reading another origin."""
    data = write_data(tmp_path / "data.jsonl")
    train.run(train.parse_args(flags(tmp_path / "first", data, "--max_iters", "4", "--stage2_iters", "0")))
    start = tmp_path / "first" / "sft_tag" / "ckpt.pt"
    other = torch.load(start, weights_only=True)
    other.update(stage="w0-1-2_tag", step=2)
    by_hand = ["--init_from", str(start), "--key_only", "--max_iters", "12", "--stage2_iters", "0"]

    def replace() -> None:
        torch.save(other, start)
    with pytest.MonkeyPatch.context() as mp:
        batches_hook(mp, {4 + 1: replace, 4 + 9: kill})  # the stream reads on at 4, where stage 1 stopped
        with pytest.raises(Killed):
            train.run(train.parse_args(flags(tmp_path / "out", data, *by_hand)))
    assert torch.load(tmp_path / "out" / "sftkey_tag" / "ckpt.pt", weights_only=True)["step"] == 8
    no_training(monkeypatch)
    code, err = main(flags(tmp_path / "out", data, "--resume", *by_hand), capsys)
    one_line_error(code, err, f"--init_from {start}: other contents")


class Rank(runtime.Dist):
    """Rank `rank` of two, whose gather hands back the states both ranks hold."""

    def __init__(self, rank: int, states: list):
        super().__init__(rank=rank, world=2)
        self.states = states

    def gather(self, value) -> list:
        return self.states


def test_every_ranks_rng_state_is_saved_and_each_rank_restores_its_own(tmp_path):
    """With dropout each rank draws its own masks: restoring rank 0's state on every rank made a resumed
    torchrun job differ from an uninterrupted one."""
    cfg = train.parse_args(["--out_dir", str(tmp_path)])
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=1, n_embd=8))
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(checkpoints.rng_state())
    path = tmp_path / "sft_tag" / "ckpt.pt"
    resume_state = {"results": {}, "seconds": {}}
    checkpoints.StageCheckpoint(str(path), cfg, "sft_tag", [], extra=resume_state, dist=Rank(0, states)).save(
        3, model, optimizer)
    saved = torch.load(path, weights_only=True)
    assert len(saved["rng_ranks"]) == 2 and saved["world"] == 2
    for rank in (0, 1):
        torch.manual_seed(99)
        assert checkpoints.StageCheckpoint(None, cfg, "sft_tag", [], saved, dist=Rank(rank, [])).restore(optimizer) == 3
        assert torch.equal(torch.get_rng_state(), states[rank]["rng"]), rank
    saved["rng_ranks"] = saved["rng_ranks"][:1]  # one rank's state for two ranks: not resumable
    torch.save(saved, path)
    with pytest.raises(ValueError, match="1 RNG states for 2 rank"):
        checkpoints.check_resume(str(path), cfg, model.config, 2, {})


# ---------------------------------------------------------------------------------------------
# We own only what we name

@pytest.mark.parametrize("stage", ["../../x", "/tmp/sftkey-absolute", "a/b", ".hidden"])
def test_a_checkpoints_stage_name_never_chooses_where_we_write(tmp_path, capsys, stage):
    data = write_data(tmp_path / "data.jsonl")
    model = GPT(GPTConfig(vocab_size=320, block_size=96, n_layer=1, n_head=2, n_embd=32))
    start = tmp_path / "downloaded.pt"
    checkpoints.save_checkpoint(str(start), model, None, train.parse_args([]), 2, {"stage": stage})
    before = sorted(p for p in tmp_path.rglob("*"))
    code, err = main(flags(tmp_path / "a" / "b" / "out", data, "--init_from", str(start), "--encoding",
                           "sftkey-chars", "--format", "tagged"), capsys)
    one_line_error(code, err, f"--init_from {start}: its stage name {stage!r}")
    assert sorted(p for p in tmp_path.rglob("*")) == before and not Path("/tmp/sftkey-absolute+sft_tag").exists()


def test_overwrite_neither_follows_a_symlinked_stage_nor_deletes_other_folders(tmp_path, capsys, monkeypatch):
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    train.run(train.parse_args(flags(out, data, "--max_iters", "2", "--stage2_iters", "0")))
    elsewhere = tmp_path / "elsewhere"
    (out / "sft_tag").rename(elsewhere)
    (out / "sft_tag").symlink_to(elsewhere, target_is_directory=True)
    before = digests(tmp_path)
    no_training(monkeypatch)
    code, err = main(flags(out, data, "--max_iters", "2", "--stage2_iters", "0", "--overwrite"), capsys)
    one_line_error(code, err, f"{out / 'sft_tag'} is a symbolic link")
    assert digests(tmp_path) == before and (elsewhere / "ckpt.pt").exists()
    (out / "sft_tag").unlink()
    (out / "notmine").mkdir()
    checkpoints.write_text(str(out / "notmine" / "ckpt.pt"), "another run's")
    code, err = main(flags(out, data, "--max_iters", "2", "--stage2_iters", "0", "--overwrite"), capsys)
    one_line_error(code, err, "holds files this run does not write", str(out / "notmine" / "ckpt.pt"))
    assert (out / "notmine" / "ckpt.pt").read_text() == "another run's"


def test_a_run_deletes_only_its_own_temporaries(tmp_path, capsys):
    """Temporaries of writes killed mid-way are removed, but only atomic_write's names for this plan's files:
    a user's own `.notes.tmp` in --out_dir stays."""
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    (out / "sft_tag").mkdir(parents=True)
    for leftover in (out / ".results.json.x1.tmp", out / "sft_tag" / ".ckpt.pt.x2.tmp", out / ".notes.tmp"):
        leftover.write_text("x")
    code, err = main(flags(out, data, "--max_iters", "2", "--stage2_iters", "0"), capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.rglob("*.tmp")) == [".notes.tmp"]


def test_overwrite_never_deletes_the_init_from_checkpoint_it_would_replace(tmp_path, capsys):
    out = tmp_path / "exp"
    args = [*TINY_EXPERIMENT, "--out_dir", str(out), "--save_ckpt", "--arms", "sft_tag"]
    assert experiment_main(args, capsys)[0] == 0
    start = out / "seed1337" / "sft_tag" / "ckpt.pt"
    before = digests(out)
    code, err = experiment_main([*args, "--overwrite", "--init_from", str(start)], capsys)
    one_line_error(code, err, f"--init_from {start} is the run file {start}, which the run would replace: move it")
    assert digests(out) == before


@pytest.mark.parametrize("mode", ["--resume", "--overwrite", ""])
def test_a_run_never_deletes_or_replaces_an_input_named_like_its_own_files(tmp_path, capsys, mode):
    """--data out/log.jsonl and --eval_data out/results.json: run files' names. --resume (no checkpoint: the log of a
    run killed before its first is deleted) and --overwrite deleted them, then wrote the run's own files in their
    place with exit 0 (a plain run was refused, as a folder holding an earlier run's files). Each is refused in one
    line naming the input, and both files are as they were."""
    out = tmp_path / "out"
    out.mkdir()
    data, test = write_data(out / "log.jsonl"), write_data(out / "results.json", offset=1)
    before = digests(out)
    code, err = main(flags(out, data, "--eval_data", str(test), *([mode] if mode else [])), capsys)
    one_line_error(code, err, f"--data {data} is the run file {data}, which the run would replace: move it")
    assert {k: v for k, v in digests(out).items() if k != checkpoints.LOCK_NAME} == before


def test_an_experiment_never_deletes_its_data_in_its_folder(tmp_path, capsys):
    out = tmp_path / "exp"
    out.mkdir()
    data = write_data(out / "results.md")  # an experiment's file name; its --eval_data elsewhere
    test = write_data(tmp_path / "test.jsonl")
    before = digests(out)
    args = [*for_data(TINY_EXPERIMENT), "--format", "tagged", "--batch_size", "4", "--out_dir", str(out)]
    code, err = experiment_main([*args, "--data", str(data), "--eval_data", str(test), "--overwrite"], capsys)
    one_line_error(code, err, f"--data {data} is the run file {data}, which the run would replace")
    assert {k: v for k, v in digests(out).items() if k != checkpoints.LOCK_NAME} == before


def test_an_experiment_names_an_init_from_of_another_shape_before_it_prints_or_writes(tmp_path, capsys):
    args = [*TINY_EXPERIMENT, "--out_dir", str(tmp_path / "exp"), "--save_ckpt", "--arms", "sft_tag"]
    assert experiment_main(args, capsys)[0] == 0
    start = tmp_path / "exp" / "seed1337" / "sft_tag" / "ckpt.pt"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        experiment.main([*args[:-2], "--n_layer", "2", "--init_from", str(start), "--out_dir", str(tmp_path / "again")])
    code, (out, err) = exit_info.value.code, capsys.readouterr()
    assert code == 2 and "--n_layer: n_layer=1 in the checkpoint but 2 here" in err and err.count("\n") == 1, err
    assert out == "" and not (tmp_path / "again").exists()


def test_every_rank_of_a_job_ends_with_rank_0s_refusal(tmp_path):
    """Rank 0 checks the folder; the other ranks raise its refusal too, instead of training on alone."""
    class Rank1(runtime.Dist):
        def __init__(self):
            super().__init__(rank=1, world=2)

        def gather(self, value) -> list:
            assert value == ""  # rank 1 checks nothing itself
            return ["--out_dir x holds the files of an earlier run", value]
    with pytest.raises(ValueError, match="holds the files of an earlier run"):
        checkpoints.RunFolder(str(tmp_path / "x")).take([("results.json",)], dist=Rank1())
    assert not (tmp_path / "x").exists()  # rank 1 neither locks nor writes


@pytest.mark.parametrize("spoil, problem", [
    (lambda c: c.update(train_config=[1]), None),
    (lambda c: c["model_config"].update(n_layer=True), "does not describe this project's GPT"),
    (lambda c: c.update(stage="s" * 250), "its stage name"),
    (lambda c: c.update(stream_start=2 ** 70), "stream position"),
    (lambda c: c.update(stream_start=5, step=-1), "stream position"),  # a negative step, though the sum is >= 0
    (lambda c: c["model_config"].update(n_layer=2 ** 40), "n_layer 1099511627776 for"),  # building it took hours
    (lambda c: c["model_config"].update(dropout=float("nan")), "dropout nan"),  # export wrote NaN into config.json
    (lambda c: c["model"].update({"transformer.ln_f.bias": c["model"]["transformer.ln_f.bias"].to_sparse()}),
     "not this model's float32 tensors (the first: transformer.ln_f.bias"),  # was NotImplementedError, a traceback
])
def test_odd_init_from_checkpoints_are_one_line_errors_or_harmless(tmp_path, capsys, spoil, problem):
    data = write_data(tmp_path / "data.jsonl")
    train.run(train.parse_args(flags(tmp_path / "first", data, "--max_iters", "2", "--stage2_iters", "0")))
    start = tmp_path / "start.pt"
    ckpt = torch.load(tmp_path / "first" / "sft_tag" / "ckpt.pt", weights_only=True)
    spoil(ckpt)
    torch.save(ckpt, start)
    code, err = main(flags(tmp_path / "out", data, "--init_from", str(start), "--key_only", "--max_iters", "1",
                           "--stage2_iters", "0"), capsys)
    if problem is None:  # flags it does not record cannot be compared: nothing to refuse
        assert code == 0, err
    else:
        one_line_error(code, err, str(start), problem)
        assert not (tmp_path / "out").exists()


def test_new_folders_are_made_durable(tmp_path, monkeypatch):
    """A file renamed into a folder made moments before survives a power loss only if the folder's
    parent was fsync'ed too."""
    synced = []
    monkeypatch.setattr(checkpoints, "_fsync_folder", lambda folder: synced.append(Path(folder)))
    checkpoints.write_text(str(tmp_path / "out" / "stage" / "ckpt.pt"), "x")
    assert synced == [tmp_path, tmp_path / "out", tmp_path / "out" / "stage"]


# ---------------------------------------------------------------------------------------------
# The experiment has train.py's folder and signal handling

TINY_EXPERIMENT = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--n_train", "200", "--n_val", "20",
                   "--n_test", "4", "--e1", "2", "--e2", "1", "--seeds", "1", "--n_boot", "20",
                   "--arms", "sft_tag,sftkey_tag", "--warmup_iters", "1", "--dtype", "float32", "--device", "cpu"]


def experiment_main(args: list[str], capsys) -> tuple[int, str]:
    try:
        experiment.main(args)
        return 0, capsys.readouterr().err
    except SystemExit as exit_info:
        return exit_info.code, capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_experiment_stops_on_a_signal_in_one_line_and_frees_its_folder(tmp_path, capsys, monkeypatch, sig):
    out = tmp_path / "exp"
    original = train.train

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), sig)
        return original(*args, **kwargs)
    monkeypatch.setattr(train, "train", signalled)
    code, err = experiment_main([*TINY_EXPERIMENT, "--out_dir", str(out)], capsys)
    assert code == 130 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert err.startswith("stopped: ") and signal.Signals(sig).name in err
    assert "--resume" not in err and "the arms finished so far are in --out_dir" in err  # it cannot be resumed
    assert not (out / checkpoints.LOCK_NAME).exists()


def test_a_signal_while_an_arms_result_is_written_stops_after_every_file_has_it(tmp_path, capsys, monkeypatch):
    """Found by trying: a Ctrl-C as sft_tag's result was printed lost it from results.json, or its rows from
    loss_log.jsonl; the result printed is the result written, in all three files."""
    out, original = tmp_path / "exp", experiment.Recorder.write

    def interrupted(self, complete):
        if not complete and len(self.rows) and not hasattr(self, "signalled"):
            self.signalled = os.kill(os.getpid(), signal.SIGINT)  # between the files it writes
            time.sleep(0.01)
        return original(self, complete)
    monkeypatch.setattr(experiment.Recorder, "write", interrupted)
    code, err = experiment_main([*TINY_EXPERIMENT, "--out_dir", str(out)], capsys)
    assert code == 130 and "the arms finished so far are in --out_dir" in err, err
    summary = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert list(summary["results"]) == ["sft_tag"] and {row["arm"] for row in rows} == {"sft_tag"}
    assert "| sft_tag |" in (out / "results.md").read_text()


def test_experiment_under_torchrun_is_one_line_not_ranks_racing_for_the_folder(tmp_path, capsys, monkeypatch):
    """Found by trying: each rank ran the whole experiment; one was refused the folder its sibling held."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = experiment_main([*TINY_EXPERIMENT, "--out_dir", str(tmp_path / "exp")], capsys)
    one_line_error(code, err, "experiment.py runs in one process, not under torchrun")
    assert not (tmp_path / "exp").exists()


def test_experiment_rerun_is_told_what_it_can_do_and_overwrite_leaves_nothing_stale(tmp_path, capsys):
    out = tmp_path / "exp"
    args = [*TINY_EXPERIMENT, "--out_dir", str(out), "--save_ckpt"]
    assert experiment_main(args, capsys)[0] == 0
    code, err = experiment_main(args, capsys)
    one_line_error(code, err, "holds the files of an earlier run", "--overwrite")
    assert "--resume" not in err  # the experiment cannot be resumed: never suggested
    code, err = experiment_main([*args[:-1], "--overwrite"], capsys)  # no --save_ckpt now: its files are not planned
    one_line_error(code, err, "holds files this run does not write", str(out / "seed1337" / "sft_tag" / "ckpt.pt"))
    assert experiment_main([*args, "--overwrite"], capsys)[0] == 0


def test_experiment_overwrite_deletes_only_an_experiments_files_not_a_train_runs(tmp_path, capsys):
    """Found in review: the experiment planned every run file of both commands, so --overwrite deleted a train.py
    run's log.jsonl and loss.png that it never writes. They are another run's files: refused, kept."""
    out = tmp_path / "exp"
    out.mkdir()
    for name in (checkpoints.LOG_NAME, checkpoints.PLOT_NAME):
        (out / name).write_text("a train.py run's")
    code, err = experiment_main([*TINY_EXPERIMENT, "--out_dir", str(out), "--overwrite"], capsys)
    one_line_error(code, err, "holds files this run does not write", str(out / checkpoints.LOG_NAME))
    assert sorted(os.listdir(out)) == sorted([checkpoints.LOG_NAME, checkpoints.PLOT_NAME])


@pytest.mark.parametrize("results", ["[1]", "{}", "x", '{"aggregates": 3, "seeds": []}',
                                     '{"config": {}, "seeds": [1], "aggregates": {"sft_tag": 1}}'])
def test_plot_only_on_files_that_are_not_an_experiments_is_one_line(tmp_path, capsys, results):
    """Found in review: --plot_only read results.json without checking it: tracebacks, or a line naming no file."""
    (tmp_path / "results.json").write_text(results)
    (tmp_path / "loss_log.jsonl").write_text("")
    code, err = experiment_main(["--plot_only", "--out_dir", str(tmp_path)], capsys)  # with matplotlib or without
    if "sft_tag" in results and plots.pyplot() is None:  # damaged deeper down: only drawing reads that far
        assert code == 0
        return
    one_line_error(code, err, f"--plot_only {tmp_path}: results.json and loss_log.jsonl there are not an "
                              f"experiment's")


def test_plot_only_refuses_a_folder_another_run_holds_and_makes_no_folder_where_there_is_none(tmp_path, capsys):
    """Found in review: --plot_only took no lock, so it drew from (and wrote plots into) a running experiment's
    folder, whose results.json is only its arms so far."""
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "loss_log.jsonl").write_text("")
    with checkpoints.FolderLock(str(tmp_path)) as holder:
        holder.acquire()
        code, err = experiment_main(["--plot_only", "--out_dir", str(tmp_path)], capsys)
        one_line_error(code, err, f"--out_dir {tmp_path} is in use by another run")
    missing = tmp_path / "none"
    code, err = experiment_main(["--plot_only", "--out_dir", str(missing)], capsys)
    assert code != 0 and "results.json" in err and not missing.exists()

def test_a_signal_before_or_after_a_run_is_one_line_and_exit_130(tmp_path):
    tiny = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--n_train", "100", "--n_val", "10",
            "--n_test", "2", "--max_iters", "1", "--stage2_iters", "0", "--out_dir", str(tmp_path / "out")]
    script = ("import startup, os, signal, train; train.main(%r); os.kill(os.getpid(), signal.SIGINT); "
              "import time; time.sleep(5)" % tiny)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("stopped: SIGINT received while nothing was being trained")
    child = subprocess.Popen([sys.executable, "train.py", "--out_dir", str(tmp_path / "early")], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    # Python's own start-up comes before startup.py (a signal then is Python's affair, not ours, and took
    # over 0.5 s on a busy machine): signal once the child catches SIGTERM, as startup.py makes it do.
    deadline = time.time() + 60
    while child.poll() is None and not catches(child.pid, signal.SIGTERM) and time.time() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGINT)  # while torch is still loading, or later: one line either way
    err = child.communicate(timeout=120)[1]
    assert child.returncode == 130 and "Traceback" not in err and err.startswith("stopped: "), err


@pytest.mark.parametrize("script", ["experiment.py", "sample.py", "show.py", "plots.py", "gpt2.py", "bench.py"])
def test_a_signal_while_a_command_starts_is_one_line_and_exit_130(script):
    """Every command imports startup.py first: a Ctrl-C while torch loads printed a KeyboardInterrupt traceback."""
    child = subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while child.poll() is None and not catches(child.pid, signal.SIGTERM) and time.time() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGINT)  # torch takes a second or more to load: --help has not been printed yet
    err = child.communicate(timeout=120)[1]
    assert child.returncode == 130 and err.splitlines() == [
        "stopped: SIGINT received while nothing was being trained or written"], err


@pytest.mark.parametrize("block_size", ["1000000000", str(2 ** 62)])  # 2 ** 62: a size that overflows
def test_a_model_too_large_for_memory_is_a_flag_error(tmp_path, capsys, block_size):
    data = write_data(tmp_path / "data.jsonl")
    code, err = main(flags(tmp_path / "out", data, "--block_size", block_size), capsys)
    one_line_error(code, err, "the model does not fit in memory", f"--block_size {block_size}")
    assert not (tmp_path / "out").exists()


# A run writes two files in place, the lock and log.jsonl: a hard link there would make it write into a file
# elsewhere (found by trying: a victim file truncated to "pid host"; a `cp -al` snapshot's log rewritten).

def test_a_hard_link_or_fifo_at_the_lock_is_refused_and_left_alone(tmp_path, capsys):
    data, victim = write_data(tmp_path / "data.jsonl"), tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / "out").mkdir()
    os.link(victim, tmp_path / "out" / checkpoints.LOCK_NAME)
    code, err = main(flags(tmp_path / "out", data), capsys)
    one_line_error(code, err, "a hard link")
    assert victim.read_text() == "keep me\n"
    os.unlink(tmp_path / "out" / checkpoints.LOCK_NAME)
    os.mkfifo(tmp_path / "out" / checkpoints.LOCK_NAME)
    code, err = main(flags(tmp_path / "out", data), capsys)
    one_line_error(code, err, f"{tmp_path / 'out' / checkpoints.LOCK_NAME}: a hard link, or not a regular file")


def test_make_folders_takes_any_spelling_of_a_folder(tmp_path):
    """os.makedirs did; a mkdir a level at a time met "a/b/" as a folder it had just made (found in review)."""
    for spelling in ("a/b/", "c/../d", "e/.", "f//g"):
        checkpoints.make_folders(str(tmp_path / spelling))
        assert os.path.isdir(tmp_path / spelling), spelling
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        checkpoints.make_folders(str(tmp_path / "file" / "below"))


def test_a_fifo_at_log_jsonl_is_refused_as_resume_starts_not_waited_on(tmp_path, capsys):
    """Opened for writing, a FIFO with no reader waits forever (found in review: a run hung at its first row)."""
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    code, err = main(flags(out, data, "--max_iters", "2", "--stage2_iters", "0"), capsys)
    assert code == 0, err
    os.unlink(out / checkpoints.LOG_NAME)
    os.mkfifo(out / checkpoints.LOG_NAME)
    os.unlink(out / checkpoints.RESULTS_NAME)  # as if stopped before the end: --resume continues it
    code, err = main(flags(out, data, "--max_iters", "2", "--stage2_iters", "0", "--resume"), capsys)
    one_line_error(code, err, f"{out / checkpoints.LOG_NAME}: a hard link, or not a regular file")


def test_a_hard_link_at_log_jsonl_is_refused_before_it_is_written(tmp_path):
    victim = tmp_path / "victim.jsonl"
    victim.write_text('{"snapshot": 1}\n')
    (tmp_path / "out").mkdir()
    os.link(victim, tmp_path / "out" / checkpoints.LOG_NAME)
    with pytest.raises(ValueError, match="a hard link"):
        checkpoints.LiveLog(str(tmp_path / "out")).append({"step": 0})
    assert victim.read_text() == '{"snapshot": 1}\n'



@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int64])
def test_checkpoint_weights_of_another_dtype_are_refused_not_cast(tmp_path, capsys, dtype):
    data = write_data(tmp_path / "data.jsonl")
    model = GPT(checkpoints.model_config(train.parse_args(flags(tmp_path, data)), D.char_encoding()))
    start = tmp_path / "start.pt"
    checkpoints.save_checkpoint(str(start), model, None, train.parse_args([]), 2)
    ckpt = torch.load(start, weights_only=True)
    ckpt["model"] = {k: v.to(dtype) for k, v in ckpt["model"].items()}
    torch.save(ckpt, start)
    code, err = main(flags(tmp_path / "out", data, "--init_from", str(start)), capsys)
    one_line_error(code, err, f"{start}:", "not this model's float32 tensors", str(dtype))
