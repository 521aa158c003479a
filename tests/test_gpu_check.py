"""scripts/gpu_check.py, the one command that checks and measures a GPU, in its CPU smoke version:
the recipe section at tiny sizes on the real GSM8K files (both stages, eager and --compile, the
greedy evaluation), the profile in its worker process, and the running of sections: their order,
logs, budget and SIGTERM, with stand-in commands that take no time."""
import json
import os
import signal
import sys
import threading
import time
import warnings

import pytest

import runtime
from conftest import GSM8K_DIR, needs_gsm8k

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import gpu_check  # noqa: E402


@needs_gsm8k
def test_quick_recipe_on_the_cpu_measures_every_stage(tmp_path, monkeypatch, capsys):
    # main() sets these for the process; monkeypatch puts them back afterwards.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", ""))
    out, work = tmp_path / "out", tmp_path / "work"
    status = gpu_check.main(_quick(tmp_path, "--sections", "recipe"))
    printed = capsys.readouterr().out
    assert status == 0, printed[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and set(report["recipe"]["runs"]) == {"eager", "compile"}
    for name, run in report["recipe"]["runs"].items():
        assert set(run["stages"]) == {"sft_tag", "sftkey_tag"}, name
        assert [r["steps"] for r in run["stages"].values()] == [3, 2]
        for r in run["stages"].values():
            assert r["seconds"] > 0 and r["tokens_per_s"] > 0 and (r["mfu"] is None or 0 < r["mfu"] <= 1)
        assert [e["after"] for e in run["evaluations"]] == ["sft_tag", "sftkey_tag"]
        assert all(e["problems"] == (2 if name == "eager" else 1) and e["seconds"] > 0 for e in run["evaluations"])
    kv = report["recipe"]["kv_cache"]
    assert kv["identical_rows"] == kv["cache"]["problems"] == kv["no_cache"]["problems"] == 2
    assert "--compile" in printed and "| compile | sftkey_tag | 2 |" in printed
    assert "--compile" in (out / "recipe.log").read_text()  # the worker's output, logged as it ran
    # the runs' small files come back in OUT, their checkpoints stay in --work_dir
    quick = json.loads((out / "recipe" / "eager" / "results.json").read_text())["config"]
    assert (quick["n_layer"], quick["n_embd"], quick["encoding"]) == (1, 32, "gpt2")
    assert not list(out.rglob("*.pt")) and len(list(work.rglob("ckpt.pt"))) == 4


def test_the_full_recipe_is_gpt2_small_on_gsm8k_in_bf16():
    import train
    cfg = train.parse_args(gpu_check.RECIPE)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 512)
    assert (cfg.encoding, cfg.format, cfg.dtype, cfg.batch_size * cfg.grad_accum) == ("gpt2", "gsm8k", "bfloat16", 32)
    assert cfg.val_acc_n == 0  # device time goes to the figures, not to answers from random weights


def test_sections_report_status_and_output(tmp_path):
    report: dict = {}
    gpu_check.run_section("ok", [sys.executable, "-c", "print('fine')"], 60, report, str(tmp_path))
    gpu_check.run_section("broken", [sys.executable, "-c", "import sys; sys.exit(3)"], 60, report)
    start = time.time()
    gpu_check.run_section("slow", [sys.executable, "-c", "print('started'); import time; time.sleep(30)"], 1, report,
                          str(tmp_path))
    assert report["ok"]["status"] == 0 and "fine" in report["ok"]["output_tail"] and "stopped" not in report["ok"]
    assert (tmp_path / "ok.log").read_text() == "fine\n"
    assert report["broken"]["status"] == 3
    # stopped at its limit, what it printed before kept in its log (written as it came)
    assert report["slow"]["stopped"] == "stopped at budget (1 s)" and time.time() - start < 10
    assert (tmp_path / "slow.log").read_text() == "started\n"


def test_missing_gsm8k_files_are_refused(tmp_path, capsys):
    assert gpu_check.main(["--gsm8k", str(tmp_path), "--tiktoken_cache", str(tmp_path)]) == 2
    assert "no train.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("value, text", [(None, "n/a"), (0.4567, "45.7%")])
def test_mfu_text(value, text):
    assert gpu_check.mfu_text(value) == text


def test_sections_take_their_order_and_limits_from_the_command_line():
    assert gpu_check.parse_sections("tests,profile:200") == [("tests", 300), ("profile", 200.0)]
    assert [name for name, _ in gpu_check.parse_sections(gpu_check.build_parser().get_default("sections"))][:3] == \
        ["profile", "tests", "recipe"]  # the open questions first: a budget cuts the end
    with pytest.raises(SystemExit):
        gpu_check.build_parser().parse_args(["--gsm8k", ".", "--tiktoken_cache", ".", "--sections", "tests,nope"])


# Sections as stand-ins: each a short Python program (a worker's writes its figures to OUT/NAME.json, as
# recipe and profile do), so that the running of sections is tested in a second or two.
def _stand_ins(tmp_path, monkeypatch, programs: dict[str, str]) -> list[str]:
    data = tmp_path / "gsm8k"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", ""))
    monkeypatch.setattr(gpu_check, "section_command",
                        lambda name, args, argv: [sys.executable, "-c", programs[name].replace("OUT", args.out)])
    return ["--gsm8k", str(data), "--tiktoken_cache", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "out"),
            "--work_dir", str(tmp_path / "work")]


MEASURES_THEN_HANGS = ("import json, time; json.dump({'profile': {'host_waits': {'train.py:1': 2}}}, "
                       "open('OUT/profile.json', 'w')); print('measured', flush=True); time.sleep(60)")


def test_sections_run_in_the_order_given_each_with_its_log(tmp_path, monkeypatch):
    programs = {name: f"print('{name} ran'); open('OUT/order.txt', 'a').write('{name},')" for name in gpu_check.SECTIONS}
    programs["bench"] += "; import sys; sys.exit(3)"  # a failure: the rest still run
    flags = _stand_ins(tmp_path, monkeypatch, programs)
    assert gpu_check.main([*flags, "--sections", "experiment,bench,tests"]) == 1
    out = tmp_path / "out"
    assert (out / "order.txt").read_text() == "experiment,bench,tests,"
    report = json.loads((out / "gpu_check.json").read_text())
    assert [k for k in report if k in gpu_check.SECTIONS] == ["experiment", "bench", "tests"]
    assert report["ok"] is False and report["bench"]["status"] == 3
    assert all((out / f"{name}.log").read_text() == f"{name} ran\n" for name in ("experiment", "bench", "tests"))


def test_the_budget_stops_a_started_section_and_skips_the_rest(tmp_path, monkeypatch):
    """--budget_s is hard: a section started gets what is left and is stopped there, its figures so far kept; a section
    after it does not start. Neither is a failure (before, a section started with the budget spent, timed out after
    1 s and marked the check FAILED; a run in this process had no limit at all)."""
    flags = _stand_ins(tmp_path, monkeypatch, {"profile": MEASURES_THEN_HANGS, "tests": "print('tests ran')"})
    start = time.time()
    assert gpu_check.main([*flags, "--sections", "profile,tests", "--budget_s", "2"]) == 0
    assert time.time() - start < 15
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["ok"] and report["profile"]["stopped"] == "stopped at budget (2 s)"
    assert report["profile"]["host_waits"] == {"train.py:1": 2}  # measured before the stop
    assert "measured" in (tmp_path / "out" / "profile.log").read_text()
    assert report["tests"] == {"skipped": "budget spent"} and not (tmp_path / "out" / "tests.log").exists()


def test_a_section_limit_stops_that_section_only(tmp_path, monkeypatch):
    flags = _stand_ins(tmp_path, monkeypatch, {"profile": MEASURES_THEN_HANGS, "tests": "print('tests ran')"})
    assert gpu_check.main([*flags, "--sections", "profile:1,tests"]) == 0
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["profile"]["stopped"] == "stopped at budget (1 s)" and report["tests"]["status"] == 0


def test_sigterm_keeps_what_was_measured(tmp_path, monkeypatch):
    """An outer `timeout` sends SIGTERM (twice: to the command, then to its group): the section is stopped, its
    figures so far go into gpu_check.json, and the check ends at once."""
    flags = _stand_ins(tmp_path, monkeypatch, {"profile": MEASURES_THEN_HANGS, "tests": "print('tests ran')"})

    def terminate():
        while not (tmp_path / "out" / "profile.json").exists():
            time.sleep(0.05)
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
    handler = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate, daemon=True).start()
    start = time.time()
    assert gpu_check.main([*flags, "--sections", "profile,tests"]) == 143
    assert time.time() - start < 30 and signal.getsignal(signal.SIGTERM) is handler  # put back
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["stopped"] == "SIGTERM" and "tests" not in report
    assert report["profile"]["stopped"] == "stopped by SIGTERM"
    assert report["profile"]["host_waits"] == {"train.py:1": 2}  # measured before the stop


def _quick(tmp_path, *flags: str) -> list[str]:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(GSM8K_DIR, "..", "tiktoken_cache")
    return ["--gsm8k", GSM8K_DIR, "--tiktoken_cache", cache, "--quick", "--device", "cpu", "--compile_backend", "eager",
            "--profile_batches", "2", "--profile_modes", "eager", "--out", str(tmp_path / "out"),
            "--work_dir", str(tmp_path / "work"), *flags]


def _profile(tmp_path, monkeypatch, *flags: str) -> dict:
    """The profile section in this process (as its worker runs it): its figures, from OUT/profile.json."""
    # the worker sets these for its process; monkeypatch puts them back afterwards
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", ""))
    monkeypatch.setenv(runtime.COMPILE_BACKEND, "inductor")  # as unset; --compile_backend eager (_quick) replaces it
    assert gpu_check.main(_quick(tmp_path, "--worker", "profile", *flags)) == 0
    return json.loads((tmp_path / "out" / "profile.json").read_text())["profile"]


@needs_gsm8k
def test_quick_profile_on_the_cpu(tmp_path, monkeypatch):
    """Stage 1 and stage 2 on the same batches, per mode, micro-batch and attention backend: every eager setting
    before the compiled ones (a cold compilation each), MFU and the stage-2 speedup in the figures."""
    rows = _profile(tmp_path, monkeypatch, "--profile_batches", "1,2", "--profile_modes", "eager,compiled",
                    "--profile_backends", "default,math")["rows"]
    assert [(r["mode"], r["batch_size"], r["backend"], r["stage"]) for r in rows] == [
        (m, n, b, s) for m in ("eager", "compiled") for n in (1, 2) for b in ("default", "math")
        for s in ("stage 1", "stage 2")]
    for one, two in zip(rows[::2], rows[1::2]):
        assert one["first_pass_ms"] > 0 and two["speedup_over_stage1"] == pytest.approx(one["step_ms"] / two["step_ms"])
        assert two["projected_share"] < one["projected_share"]  # stage 2 projects the answer only
        assert "mfu" in one and "mfu" in two  # None on a CPU: no peak to divide by
    assert (tmp_path / "out" / "profile.txt").read_text().count("== batch ") == 8


@needs_gsm8k
def test_a_micro_batch_the_data_cannot_fill_is_a_row_and_the_other_settings_go_on(tmp_path, monkeypatch):
    """Found by running the device command with --quick: batch 128 of 97 examples ended the whole profile."""
    rows = _profile(tmp_path, monkeypatch, "--profile_batches", "100000,2")["rows"]
    assert "examples for batches of 100000" in rows[0]["error"] and [r.get("stage") for r in rows[1:]] == [
        "stage 1", "stage 2"]


@needs_gsm8k
def test_each_profile_setting_reports_its_own_peak_memory(tmp_path, monkeypatch):
    """The peak is reset before each setting: it was the process's peak so far (the recipe's, or a wider setting's)."""
    resets = []
    monkeypatch.setattr(gpu_check, "reset_peak_memory", lambda device: resets.append(device))
    monkeypatch.setattr(gpu_check, "peak_memory_gb", lambda device: float(len(resets)))  # GB "since the last reset"
    rows = _profile(tmp_path, monkeypatch, "--profile_backends", "default,math")["rows"]
    assert [r["peak_memory_gb"] for r in rows] == [1.0, 1.0, 2.0, 2.0]


@needs_gsm8k
@pytest.mark.filterwarnings("ignore:called a synchronizing")  # the stand-in's, from the profile's own steps
def test_the_profile_names_the_lines_where_a_training_step_waits_for_the_gpu(tmp_path, monkeypatch):
    """CUDA's sync debug mode warns at each host wait; the profile counts those warnings by file:line over two steps
    of train.train. On a CPU nothing warns, so a stand-in warns where CUDA would: at each micro-batch's weights."""
    import sftkey
    import train
    token_weights = sftkey.token_weights

    def waits(roles, weights):
        warnings.warn("called a synchronizing CUDA operation", stacklevel=2)  # the caller's line, as CUDA's warning
        return token_weights(roles, weights)
    monkeypatch.setattr(sftkey, "token_weights", waits)
    sites = _profile(tmp_path, monkeypatch, "--profile_backends", "default")["host_waits"]
    line = next(n for n, text in enumerate(open(train.__file__), 1)
                if "sftkey.token_weights(roles, stage.weights)" in text)
    # A micro-batch a step (--grad_accum 1 in --quick), two steps; the profile's own steps call token_weights as
    # well, but they are not counted (validation_loss does not call it)
    assert sites == {f"train.py:{line}": 2}


@needs_gsm8k
def test_the_profile_compiles_with_the_compile_backend_given(tmp_path, monkeypatch):
    """--compile_backend reached the recipe only: the profile's compiled settings used inductor whatever it said (in the
    CPU smoke version of the device command, minutes of C++ build). Found by running that command with --quick."""
    import torch
    backends = []

    def recording(model, backend="inductor", **kwargs):  # compiles nothing: the model runs eagerly
        backends.append(backend)
        return model
    monkeypatch.setattr(torch, "compile", recording)
    rows = _profile(tmp_path, monkeypatch, "--profile_modes", "compiled")["rows"]
    assert backends == ["eager"] and [r["mode"] for r in rows] == ["compiled", "compiled"]


@needs_gsm8k
def test_the_host_waits_are_measured_before_the_settings(tmp_path, monkeypatch):
    """The host waits take seconds, the settings up to the section's limit (a cold compilation alone 60-90 s on the
    H200): measured last, they were the first thing a profile stopped at its budget lost."""
    from model import GPT
    order, modes = [], []
    host_waits, profiler_table, forward = gpu_check.host_waits, gpu_check.profiler_table, GPT.forward
    monkeypatch.setattr(gpu_check, "host_waits", lambda *a: (host_waits(*a), order.append("host waits"))[0])
    monkeypatch.setattr(gpu_check, "profiler_table", lambda *a: order.append("setting") or profiler_table(*a))
    monkeypatch.setattr(GPT, "forward", lambda self, *a, **k: modes.append((bool(order), self.training))
                        or forward(self, *a, **k))
    assert _profile(tmp_path, monkeypatch, "--profile_batches", "1,2")["host_waits"] == {}  # a CPU waits nowhere
    assert order == ["host waits", "setting", "setting"]
    # host_waits validates (eval mode) at its last step: the settings after it still time training steps
    assert (True, False) not in modes and (False, False) in modes and (True, True) in modes

    def fails(*args):
        raise RuntimeError("no sync debug mode here")
    monkeypatch.setattr(gpu_check, "host_waits", fails)  # first now, so its failure must not end the profile
    found = _profile(tmp_path, monkeypatch, "--profile_batches", "2")
    assert found["host_waits"] == {"error": "RuntimeError: no sync debug mode here"} and len(found["rows"]) == 2


def test_the_summary_names_a_profile_setting_that_failed():
    """A setting that failed (out of memory at micro-batch 128, say) is a row of the JSON with its error; the printed
    summary, what the device tool's output shows, left it out without a word."""
    row = {"batch_size": 16, "mode": "eager", "backend": "default", "step_ms": 27.1, "positions_per_s": 1e5,
           "projected_share": 0.6, "mfu": 0.054, "peak_memory_gb": 4.0}
    report = {"profile": {"rows": [{**row, "stage": "stage 1", "first_pass_ms": 40.2},
                                   {**row, "stage": "stage 2", "speedup_over_stage1": 0.96},
                                   {"batch_size": 128, "mode": "compiled", "backend": "default",
                                    "error": "CUDA out of memory. Tried to allocate 9.20 GiB"}]}}
    table = gpu_check.summary_table(report)
    assert "| 16 | eager | default | stage 2 | 27.1 |" in table
    assert "not measured: micro-batch 128, compiled, attention default: CUDA out of memory" in table
