"""--config FILE.json: a JSON object of flag values, under the command line; a finished run's results.json
"config" block repeats that run; a bad file is refused in one line (exit 2) that names it. experiment.py too."""
import dataclasses
import json
from pathlib import Path

import pytest

import experiment
import train

TINY = ["--n_train", "200", "--n_test", "4", "--n_val", "20", "--max_iters", "4", "--stage2_iters", "2",
        "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--batch_size", "8", "--block_size", "64",
        "--device", "cpu", "--dtype", "float32", "--eval_interval", "2", "--log_interval", "2",
        "--val_acc_n", "0", "--warmup_iters", "1"]


def write(path: Path, obj) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def main(module, args: list[str], capsys) -> tuple[int, str]:
    """`module.main`'s exit code (0 when it returns) and stderr."""
    try:
        module.main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def no_run(monkeypatch) -> None:
    """Any run started fails the test: a refused --config must stop before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run started")
    monkeypatch.setattr(train, "run", refuse)
    monkeypatch.setattr(experiment, "run_experiment", refuse)


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ---------------------------------------------------------------------------------------------
# Setting flags, and the command line over the file

def test_config_file_sets_flags(tmp_path):
    path = write(tmp_path / "c.json", {"max_iters": 7, "lr": 0.003, "untagged": True, "format": "messages",
                                       "weights": "0,1,2", "out_dir": "somewhere"})
    cfg = train.parse_args(["--config", path])
    assert (cfg.max_iters, cfg.lr, cfg.untagged, cfg.format, cfg.weights, cfg.out_dir) == \
        (7, 0.003, True, "messages", "0,1,2", "somewhere")
    # what the file leaves out keeps its default
    assert cfg.stage2_iters == train.TrainConfig().stage2_iters and cfg.n_layer == train.TrainConfig().n_layer
    assert not hasattr(cfg, "config")
    assert train.parse_args(["--config", write(tmp_path / "empty.json", {})]) == train.TrainConfig()


@pytest.mark.parametrize("before", [True, False], ids=["flags_after_config", "flags_before_config"])
def test_the_command_line_overrides_the_file(tmp_path, before):
    path = write(tmp_path / "c.json", {"max_iters": 7, "lr": 0.003, "untagged": True, "n_layer": 3})
    flags = ["--max_iters", "9", "--no-untagged", "--lr", "1e-4"]
    cfg = train.parse_args(["--config", path, *flags] if before else [*flags, "--config", path])
    assert (cfg.max_iters, cfg.untagged, cfg.lr) == (9, False, 1e-4)
    assert cfg.n_layer == 3  # not on the command line: the file's


def test_a_whole_number_is_accepted_for_a_float_flag(tmp_path):
    cfg = train.parse_args(["--config", write(tmp_path / "c.json", {"lr": 1, "dropout": 0, "key_weight": 3})])
    assert (cfg.lr, cfg.dropout, cfg.key_weight) == (1.0, 0.0, 3.0)


# ---------------------------------------------------------------------------------------------
# A finished run's config block repeats it

def test_results_config_block_repeats_the_run(tmp_path, capsys):
    out = tmp_path / "first"
    code, err = main(train, [*TINY, "--out_dir", str(out), "--lr", "3e-3", "--weights", "0,1,2", "--seed", "5"],
                     capsys)
    assert code == 0, err
    first = json.loads((out / "results.json").read_text())
    original = train.parse_args([*TINY, "--out_dir", str(out), "--lr", "3e-3", "--weights", "0,1,2", "--seed", "5"])
    assert first["config"] == dataclasses.asdict(original)
    path = write(tmp_path / "repeat.json", first["config"])
    assert train.parse_args(["--config", path]) == original
    again_dir = tmp_path / "again"
    assert train.parse_args(["--config", path, "--out_dir", str(again_dir)]) == \
        dataclasses.replace(original, out_dir=str(again_dir))

    code, err = main(train, ["--config", path, "--out_dir", str(again_dir)], capsys)
    assert code == 0, err
    again = json.loads((again_dir / "results.json").read_text())
    assert again["config"] == {**first["config"], "out_dir": str(again_dir)}
    same = lambda r: {k: v for k, v in r.items() if k != "tokens_per_s"}  # noqa: E731  (time, not the run)
    assert [same(r) for r in again["log"]] == [same(r) for r in first["log"]]
    assert again["results"] == first["results"]


# ---------------------------------------------------------------------------------------------
# A bad file: one line, exit 2, the file named, nothing run

@pytest.mark.parametrize("content, fragments", [
    ({"max_itres": 3}, ["'max_itres' is not a flag"]),
    ({"config": "other.json"}, ["'config' is not a flag"]),
    ({"max_iters": 2.5}, ["'max_iters'", "2.5"]),
    ({"max_iters": "3"}, ["'max_iters'"]),
    ({"max_iters": True}, ["'max_iters'"]),
    ({"lr": "x"}, ["'lr'", "'x'"]),
    ({"lr": True}, ["'lr'"]),
    ({"untagged": 1}, ["'untagged'"]),
    ({"untagged": "true"}, ["'untagged'"]),
    ({"format": None}, ["'format'"]),
    ({"lr": 2 ** 1024 - 1}, ["'lr' must be a JSON float"]),  # a whole number no float holds: was an OverflowError
    ('{"seed": 1, "seed": 2}', ["'seed' appears twice"]),  # was the last one, silently
    ([1], ["object"]),
    ("3", ["object"]),
], ids=["unknown_key", "nested_config", "float_for_int", "string_for_int", "bool_for_int", "string_for_float",
        "bool_for_float", "int_for_bool", "string_for_bool", "null_for_string", "huge_int_for_float", "key_twice",
        "a_list", "a_number"])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, capsys, monkeypatch, content, fragments):
    path = write(tmp_path / "bad config.json", content)
    no_run(monkeypatch)
    code, err = main(train, ["--config", path, "--out_dir", str(tmp_path / "out")], capsys)
    one_line_error(code, err, f"--config {path}", *fragments)
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    no_run(monkeypatch)
    path = str(tmp_path / "nowhere.json")
    code, err = main(train, ["--config", path], capsys)
    one_line_error(code, err, path, "no such file")
    code, err = main(train, ["--config", str(tmp_path)], capsys)  # a folder
    one_line_error(code, err, str(tmp_path), "not a regular file")


@pytest.mark.parametrize("text", ['{"max_iters": 3,', "", '{"max_iters": 3} {"lr": 1}', "{'max_iters': 3}"],
                         ids=["truncated", "empty", "two_objects", "single_quotes"])
def test_invalid_json_in_a_config_file_is_one_line_naming_it(tmp_path, capsys, monkeypatch, text):
    path = write(tmp_path / "broken.json", text)
    no_run(monkeypatch)
    code, err = main(train, ["--config", path], capsys)
    one_line_error(code, err)  # whether it names the file: test_invalid_json_error_names_the_file


def test_invalid_json_error_names_the_file(tmp_path, capsys, monkeypatch):
    no_run(monkeypatch)
    for text in ('{"max_iters": 3,', "", "{'max_iters': 3}"):
        path = write(tmp_path / "broken.json", text)
        code, err = main(train, ["--config", path], capsys)
        one_line_error(code, err, path)


# ---------------------------------------------------------------------------------------------
# experiment.py reads --config as well

def test_experiment_accepts_a_config_file(tmp_path):
    path = write(tmp_path / "c.json", {"max_iters": 5, "stage2_iters": 2, "arms": "sft_tag,sftkey_tag", "seeds": 2,
                                       "n_test": 7, "key_weight": 2})
    cfg, own = experiment.parse_args(["--config", path, "--seeds", "1"])
    assert (cfg.max_iters, cfg.stage2_iters, cfg.n_test, cfg.key_weight) == (5, 2, 7, 2.0)
    assert own["names"] == ["sft_tag", "sftkey_tag"] and own["n_seeds"] == 1  # the command line over the file
    # the experiment's own defaults stand where the file is silent
    assert cfg.out_dir == "out/experiment" and cfg.eval_interval == 100
    # --e1 (the same setting as --max_iters) on the command line overrides the file's max_iters
    assert experiment.parse_args(["--config", path, "--e1", "3"])[0].max_iters == 3


def test_experiment_refuses_a_bad_config_file_in_one_line(tmp_path, capsys, monkeypatch):
    no_run(monkeypatch)
    for content, fragment in (({"seeds": "2"}, "'seeds'"), ({"e1": 3}, "'e1' is not a flag"), ([], "object")):
        path = write(tmp_path / "bad.json", content)
        code, err = main(experiment, ["--config", path, "--out_dir", str(tmp_path / "out")], capsys)
        one_line_error(code, err, f"--config {path}", fragment)


def test_experiment_config_block_repeats_the_whole_experiment(tmp_path):
    """Its arms, seeds, sweep and resamples too, not only train.py's flags."""
    given = ["--arms", "sftsft_tag,sft_tag,sftkey_tag", "--stage2_lrs", "3e-5,1e-4", "--seeds", "2", "--n_boot", "50",
             "--seed", "7", "--e1", "5", "--out_dir", str(tmp_path / "x")]
    cfg, own = experiment.parse_args(given)
    recorder = experiment.Recorder(cfg, own["names"], [cfg.seed, cfg.seed + 1], own["n_boot"])
    block = recorder.summary(complete=False)["config"]
    assert {k: block[k] for k in ("arms", "seeds", "n_boot", "stage2_lrs")} == {
        "arms": "sft_tag,sftkey_tag,sftsft_tag", "seeds": 2, "n_boot": 50, "stage2_lrs": "3e-05,0.0001"}
    assert experiment.parse_args(["--config", write(tmp_path / "again.json", block)]) == (cfg, own)
    assert experiment.parse_args([]) != (cfg, own)  # the block, not the defaults, made them equal
    with pytest.raises(ValueError, match="'arms' is not a flag"):  # an experiment's block is not one train.py run
        train.parse_args(["--config", write(tmp_path / "train.json", block)])
