"""scripts/gpu_check.py, the one command that checks and measures a GPU, in its CPU smoke version:
the recipe section at tiny sizes on the real GSM8K files (both stages, eager and --compile, the
greedy evaluation), and the sections that run other commands."""
import json
import os
import sys
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
    monkeypatch.setenv(runtime.COMPILE_BACKEND, "eager")
    cache = os.environ["TIKTOKEN_CACHE_DIR"] or os.path.join(GSM8K_DIR, "..", "tiktoken_cache")
    status = gpu_check.main(["--gsm8k", GSM8K_DIR, "--tiktoken_cache", cache, "--quick", "--device", "cpu",
                             "--sections", "recipe", "--compile_backend", "eager", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and set(report["recipe"]["runs"]) == {"eager", "compile"}
    for name, run in report["recipe"]["runs"].items():
        assert set(run["stages"]) == {"sft_tag", "sftkey_tag"}, name
        assert [r["steps"] for r in run["stages"].values()] == [3, 2]
        for r in run["stages"].values():
            assert r["seconds"] > 0 and r["tokens_per_s"] > 0 and (r["mfu"] is None or 0 < r["mfu"] <= 1)
        assert [e["after"] for e in run["evaluations"]] == ["sft_tag", "sftkey_tag"]
        assert all(e["problems"] == (2 if name == "eager" else 1) and e["seconds"] > 0 for e in run["evaluations"])
    assert "--compile" in out and "| compile | sftkey_tag | 2 |" in out
    quick = json.loads((tmp_path / "eager" / "results.json").read_text())["config"]
    assert (quick["n_layer"], quick["n_embd"], quick["encoding"]) == (1, 32, "gpt2")
    assert train_is_unpatched()


def test_the_full_recipe_is_gpt2_small_on_gsm8k_in_bf16():
    import train
    cfg = train.parse_args(gpu_check.RECIPE)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 512)
    assert (cfg.encoding, cfg.format, cfg.dtype, cfg.batch_size * cfg.grad_accum) == ("gpt2", "gsm8k", "bfloat16", 32)


def train_is_unpatched() -> bool:
    """The probe put the project's functions back."""
    import train
    return train.train.__module__ == "train" and train.evaluate.__module__ == "train" and \
        runtime.Meter.line.__qualname__ == "Meter.line"


def test_sections_report_status_and_output(tmp_path):
    report: dict = {}
    gpu_check.run_section("ok", [sys.executable, "-c", "print('fine')"], 60, report)
    gpu_check.run_section("broken", [sys.executable, "-c", "import sys; sys.exit(3)"], 60, report)
    gpu_check.run_section("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1, report)
    assert report["ok"]["status"] == 0 and "fine" in report["ok"]["output_tail"]
    assert report["broken"]["status"] == 3
    assert report["slow"]["status"] == 124 and "timed out" in report["slow"]["output_tail"]


def test_missing_gsm8k_files_are_refused(tmp_path, capsys):
    assert gpu_check.main(["--gsm8k", str(tmp_path), "--tiktoken_cache", str(tmp_path)]) == 2
    assert "no train.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("value, text", [(None, "n/a"), (0.4567, "45.7%")])
def test_mfu_text(value, text):
    assert gpu_check.mfu_text(value) == text


@needs_gsm8k
def test_quick_profile_and_runs_on_the_cpu(tmp_path, monkeypatch, capsys):
    """The profile (stage 1 and stage 2 on the same batches, per mode and attention backend), then
    train.py and experiment.py as sections, each leaving its log as it runs."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", ""))
    monkeypatch.setenv(runtime.COMPILE_BACKEND, "eager")
    cache = os.environ["TIKTOKEN_CACHE_DIR"] or os.path.join(GSM8K_DIR, "..", "tiktoken_cache")
    status = gpu_check.main(["--gsm8k", GSM8K_DIR, "--tiktoken_cache", cache, "--quick", "--device", "cpu",
                             "--sections", "profile,default,experiment", "--compile_backend", "eager",
                             "--profile_batches", "2", "--profile_modes", "eager,compiled",
                             "--profile_backends", "default,math", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = report["profile"]["rows"]
    assert [(r["mode"], r["backend"], r["stage"]) for r in rows] == [
        (m, b, s) for m in ("eager", "compiled") for b in ("default", "math") for s in ("stage 1", "stage 2")]
    for one, two in zip(rows[::2], rows[1::2]):
        assert one["first_pass_ms"] > 0 and two["speedup_over_stage1"] == pytest.approx(one["step_ms"] / two["step_ms"])
        assert two["projected_share"] < one["projected_share"]  # stage 2 projects the answer only
    assert (tmp_path / "profile.txt").read_text().count("== batch 2") == 4
    for name in ("default", "experiment"):
        assert report[name]["status"] == 0, report[name]["output_tail"]
        assert "sftkey_tag" in (tmp_path / f"{name}.log").read_text()
    assert (tmp_path / "experiment" / "results.md").exists()


def _quick(tmp_path, *flags: str) -> list[str]:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(GSM8K_DIR, "..", "tiktoken_cache")
    return ["--gsm8k", GSM8K_DIR, "--tiktoken_cache", cache, "--quick", "--device", "cpu", "--compile_backend", "eager",
            "--profile_batches", "2", "--profile_modes", "eager", "--out", str(tmp_path), *flags]


@needs_gsm8k
def test_each_profile_setting_reports_its_own_peak_memory(tmp_path, monkeypatch):
    """The peak is reset before each setting: it was the process's peak so far (the recipe's, or a wider setting's)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", ""))
    resets = []
    monkeypatch.setattr(gpu_check, "reset_peak_memory", lambda device: resets.append(device))
    monkeypatch.setattr(gpu_check, "peak_memory_gb", lambda device: float(len(resets)))  # GB "since the last reset"
    assert gpu_check.main(_quick(tmp_path, "--sections", "profile", "--profile_backends", "default,math")) == 0
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["profile"]["rows"]
    assert [r["peak_memory_gb"] for r in rows] == [1.0, 1.0, 2.0, 2.0]


@needs_gsm8k
def test_the_profile_is_saved_before_the_next_section_starts(tmp_path, monkeypatch):
    """A check stopped from outside during a later section (the experiment, under a call's time limit) keeps the
    profile's figures in gpu_check.json: they were written only at the very end."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", ""))
    seen = {}

    def section(name, command, timeout, report, log_dir=None):
        seen[name] = json.loads((tmp_path / "gpu_check.json").read_text())
        report[name] = {"status": 0, "seconds": 0.0, "output_tail": ""}
    monkeypatch.setattr(gpu_check, "run_section", section)
    assert gpu_check.main(_quick(tmp_path, "--sections", "profile,experiment")) == 0
    assert [r["stage"] for r in seen["experiment"]["profile"]["rows"]] == ["stage 1", "stage 2"]


@needs_gsm8k
def test_a_budget_ends_the_check_by_itself_with_its_report_complete(tmp_path, monkeypatch):
    """--budget_s: no run or profile setting starts once it is spent, and a section's limit is cut to what is left (the
    experiment's 1800 s ran past the 600 s of a GPU call, which then lost the report's end)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", ""))
    status = gpu_check.main(_quick(tmp_path, "--sections", "recipe,profile,experiment", "--budget_s", "1e-6"))
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 1 and report["ok"] is False and report["seconds"] < 120
    assert all("skipped" in run for run in report["recipe"]["runs"].values()) and "kv_cache" not in report["recipe"]
    assert [r["error"] for r in report["profile"]["rows"]] == ["skipped: no time left"]
    assert report["experiment"]["status"] == 124 and "timed out after 1 s" in report["experiment"]["output_tail"]


@needs_gsm8k
@pytest.mark.filterwarnings("ignore:called a synchronizing")  # the stand-in's, from the profile's own steps
def test_the_profile_names_the_lines_where_a_training_step_waits_for_the_gpu(tmp_path, monkeypatch):
    """CUDA's sync debug mode warns at each host wait; the profile counts those warnings by file:line over two steps
    of train.train. On a CPU nothing warns, so a stand-in warns where CUDA would: at each micro-batch's weights."""
    import sftkey
    import train
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", ""))
    token_weights = sftkey.token_weights

    def waits(roles, weights):
        warnings.warn("called a synchronizing CUDA operation", stacklevel=2)  # the caller's line, as CUDA's warning
        return token_weights(roles, weights)
    monkeypatch.setattr(sftkey, "token_weights", waits)
    assert gpu_check.main(_quick(tmp_path, "--sections", "profile", "--profile_backends", "default")) == 0
    line = next(n for n, text in enumerate(open(train.__file__), 1)
                if "sftkey.token_weights(roles, stage.weights)" in text)
    sites = json.loads((tmp_path / "gpu_check.json").read_text())["profile"]["host_waits"]
    assert sites[f"train.py:{line}"] == 2  # a micro-batch a step (--grad_accum 1 in --quick), two steps
    # validation_loss's lines show too; the profile's own steps call token_weights as well, but they are not counted
    assert all(site.startswith("train.py:") for site in sites) and sum(sites.values()) > 2
