"""The fast paths against the plain ones, the FLOP formula against counted FLOPs, and bench.py end to end.

Speed itself is never asserted: only that the fast paths compute the same thing and that the
benchmark runs and reports every figure.
"""
import collections
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import bench
import data as D
import runtime
import sftkey
import train as T
from model import GPT, GPTConfig
from test_owned_files import catches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {"stage 1": sftkey.role_weights(), "stage 2": sftkey.role_weights(key_only=True),
          "key x5": sftkey.role_weights(key_weight=5.0)}


@pytest.fixture(scope="module")
def batch():
    """Four synthetic examples of different lengths, so the batch has padding too."""
    enc = D.char_encoding()
    data = D.tokenize(D.synthetic_task(4, seed=3), enc, block_size=96)
    assert len({len(ids) for ids in data.ids}) > 1
    return D.collate(data.ids, data.roles, "cpu")


def _model(dtype=torch.float32, **overrides) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(**{**dict(vocab_size=320, block_size=96, n_layer=2, n_head=2, n_embd=32), **overrides})
    return GPT(config).to(dtype)


def _loss_and_grads(model: GPT, loss_sum, x, y, w) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model(x), model.lm_head, y, w) / w.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage", STAGES)
def test_supervised_only_projection_equals_full_projection(batch, stage):
    x, y, roles = batch
    w = sftkey.token_weights(roles, STAGES[stage]).double()
    model = _model(torch.float64)
    fast = _loss_and_grads(model, sftkey.weighted_loss_sum, x, y, w)
    plain = _loss_and_grads(model, bench.full_projection_loss_sum, x, y, w)
    assert 0 < int((w != 0).sum()) < int((roles != sftkey.PAD).sum())  # the mask really skips positions
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-12, atol=0)
    assert fast[1].keys() == plain[1].keys()
    for name in fast[1]:
        torch.testing.assert_close(fast[1][name], plain[1][name], rtol=1e-9, atol=1e-12, msg=name)


class _Operators(TorchDispatchMode):
    """Every operator run inside, by name; with a boolean index, "[mask]" added (that index counts on the host)."""
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masks = [t for a in args if isinstance(a, (list, tuple)) for t in a
                 if isinstance(t, torch.Tensor) and t.dtype == torch.bool]
        self.seen.append(func.__name__ + " [mask]" * bool(masks))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stage", STAGES)
def test_a_micro_batch_weights_and_loss_ask_the_host_once(batch, stage):
    """On a GPU the host waits wherever an operator needs a count or a host value: a table of weights copied in,
    each boolean-mask index forward and backward (5 waits a micro-batch). Now one: the count of kept positions."""
    x, y, roles = batch
    model = _model()
    with _Operators() as ops:
        w = sftkey.token_weights(roles, STAGES[stage])
        sftkey.weighted_loss_sum(model(x), model.lm_head, y, w).backward()
    waits = [op for op in ops.seen if op.endswith("[mask]") or op.split(".")[0] in (
        "nonzero", "lift_fresh", "_to_copy", "_local_scalar_dense", "masked_select", "item")]
    assert waits == ["nonzero.default"]


def test_a_training_step_asks_the_host_once_per_micro_batch_and_once_for_the_norm(monkeypatch):
    """Three steps of train.train, two micro-batches each, logging and validation taken out: the host would wait for a
    GPU at each micro-batch's count of kept positions and at the norm's check, nowhere else; the only tensors made
    from host data are each micro-batch's inputs, targets and roles (pinned on CUDA, copied without waiting)."""
    monkeypatch.setattr(T, "validation_loss", lambda *args: {"thinking": 0.0, "key": 0.0})
    monkeypatch.setattr(runtime.Meter, "line", lambda *args: {})
    monkeypatch.setattr(runtime.Meter, "validation_line", lambda *args: {})
    copies = []  # a copy to the host (.tolist(), .cpu(), .numpy()) runs no operator on the CPU: watched by name
    for name in ("tolist", "cpu", "numpy"):
        def watched(tensor, *args, _method=getattr(torch.Tensor, name), **kwargs):
            copies.append(_method.__name__)
            return _method(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, watched)
    data = D.tokenize(D.synthetic_task(64, seed=5), D.char_encoding(), block_size=96)
    cfg = T.TrainConfig(batch_size=4, grad_accum=2, val_acc_n=0)
    with _Operators() as ops:
        T.train(_model(), data, data, cfg, sftkey.Stage("s", STAGES["stage 1"], 3, 1e-3), "cpu", torch.float32, [])
    counted = collections.Counter(op.split(".")[0] for op in ops.seen)
    waits = {op: n for op, n in counted.items() if op in ("nonzero", "_local_scalar_dense", "item", "masked_select")}
    assert waits == {"nonzero": 3 * 2, "_local_scalar_dense": 3} and not any(op.endswith("[mask]") for op in ops.seen)
    assert counted["lift_fresh"] == 3 * 2 * 3
    assert copies == []


@pytest.mark.parametrize("full", [True, False])
def test_flop_formula_matches_counted_matmul_flops(batch, full):
    """GPT.flops_per_token against PyTorch's FLOP counter over one forward and backward.

    The math attention kernel is forced so that the counter sees the attention products too.
    """
    x, y, roles = batch
    w = sftkey.token_weights(roles, STAGES["stage 2"])
    model = _model()
    loss_sum = bench.full_projection_loss_sum if full else sftkey.weighted_loss_sum
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_sum(model(x), model.lm_head, y, w).backward()
    positions = x.numel()
    projected = positions if full else int((w != 0).sum())
    expected = model.flops_per_token(x.size(1), projected / positions) * positions
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-6)


def test_mfu_is_formula_flops_over_peak():
    model = _model()
    peak = 989e12
    assert runtime.mfu(model, 1000.0, 50, 0.1, peak) == pytest.approx(model.flops_per_token(50, 0.1) * 1000.0 / peak)


def test_peak_is_a_known_gpus_data_sheet_figure_and_none_elsewhere(monkeypatch):
    """MFU needs a peak no run can beat: a data sheet's. A CPU's would have to be timed, and timings on a
    shared machine moved by 2x, so a CPU (or an unknown GPU, or float32) shows no MFU."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert runtime.peak_flops("cuda", torch.bfloat16) == 989e12
    assert runtime.peak_flops("cuda", torch.float32) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert runtime.peak_flops("cuda:0", torch.bfloat16) is None
    assert runtime.peak_flops("cpu", torch.bfloat16) is None and runtime.peak_flops("cpu", torch.float32) is None


# torch.cuda.get_device_name strings as real machines report them, and the dense bf16 peak each should get
# (None: not in the data-sheet table, so no MFU is shown).
DEVICE_NAMES = [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA L40", None),
    ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA GeForce RTX 3090", 71e12), ("NVIDIA GeForce RTX 3090 Ti", None),
    ("NVIDIA GeForce RTX 4090 D", None), ("NVIDIA GeForce RTX 4090 Laptop GPU", None), ("NVIDIA B200", 2250e12),
    ("NVIDIA RTX A6000", None), ("Tesla T4", None), ("NVIDIA A10G", None), ("nvidia h100 80gb hbm3", 989e12),
]


@pytest.mark.parametrize("name, peak", DEVICE_NAMES)
def test_gpu_peak_table_matches_real_device_names(name, peak):
    assert runtime.gpu_bf16_peak(name) == peak


def test_mfu_is_the_formulas_and_absent_without_a_peak(capsys):
    model = _model()
    cfg = T.TrainConfig(batch_size=2, grad_accum=1)
    roles = torch.tensor([[sftkey.THINK, sftkey.KEY, sftkey.PAD], [sftkey.THINK, sftkey.THINK, sftkey.KEY]])
    fine = runtime.Meter(model, cfg, runtime.Dist(), "cpu", iters=10, first_step=0, peak=1e18)
    fine.count(roles, sftkey.token_weights(roles, sftkey.role_weights()))
    value = fine.line(sftkey.Stage("sft_tag", (0, 1, 1), 10, 1e-3), 0, 1e-3, torch.tensor(1.0))["mfu"]
    assert 0 < value < 1e-3
    none = runtime.Meter(model, cfg, runtime.Dist(), "cpu", iters=10, first_step=0, peak=None)
    none.count(roles, sftkey.token_weights(roles, sftkey.role_weights()))
    assert "mfu" not in none.line(sftkey.Stage("sft_tag", (0, 1, 1), 10, 1e-3), 0, 1e-3, torch.tensor(1.0))
    assert "MFU" not in capsys.readouterr().out.splitlines()[-1]


class _SameOnEveryRank(runtime.Dist):
    """One of `world` ranks that all count the same: all_reduce sums `world` copies, as torch.distributed would."""

    def all_reduce(self, value, op="sum"):
        assert op == "sum"
        return value * self.world


@pytest.mark.parametrize("world", [1, 2])
def test_meter_line_figures_from_counted_tokens_and_a_fake_clock(monkeypatch, capsys, world):
    """A log line's tokens/s (the job's non-padding tokens per second of training, validation left out), MFU (the
    FLOPs of the positions run, at the mean padded width, per second, over the peak of all ranks) and ETA
    (seconds per step so far times the steps left), worked out by hand: 4 steps of 2 rows x 3 positions, one
    of them padding and 2 with a loss weight per batch; 10 s elapsed, 2 of them in validation."""
    now = [100.0]
    monkeypatch.setattr(runtime, "time", type("Clock", (), {"time": staticmethod(lambda: now[0])}))
    model = _model()  # vocab 320, 2 layers, 32 wide
    cfg = T.TrainConfig(batch_size=2, grad_accum=1)
    dist = _SameOnEveryRank(rank=0, world=world) if world > 1 else runtime.Dist()
    meter = runtime.Meter(model, cfg, dist, "cpu", iters=10, first_step=0, peak=1e9)
    roles = torch.tensor([[sftkey.THINK, sftkey.KEY, sftkey.PAD], [sftkey.THINK, sftkey.THINK, sftkey.KEY]])
    weights = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    for _ in range(4):
        meter.count(roles, weights)
    now[0] = 104.0
    with meter.paused():
        now[0] = 106.0
    now[0] = 110.0
    row = meter.line(sftkey.Stage("sft_tag", (0, 1, 1), 10, 1e-3), 3, 1e-3, torch.tensor(1.5))
    assert row["loss"] == 1.5 and "dft" not in row  # a plain stage's loss is cross-entropy: no mark
    assert row["tokens_per_s"] == pytest.approx(world * 4 * 5 / 8)  # 5 real tokens a batch, 8 s busy: the job's
    flops = 6 * 12 * 2 * 32 ** 2 + 12 * 2 * 32 * 3 + 6 * 32 * 320 * (2 / 6)  # GPT.flops_per_token's formula
    assert row["mfu"] == pytest.approx(flops * (4 * 6 / 8) / 1e9)  # the same on every rank: not x world
    line = capsys.readouterr().out
    assert "0:00:10 elapsed | ETA 0:00:12" in line  # 8 s busy / 4 steps x 6 steps left
    assert [runtime.clock(s) for s in (0, 59.9, 3725, 90061)] == ["0:00:00", "0:00:59", "1:02:05", "25:01:01"]


def test_peak_memory_sees_the_full_logits(batch):
    """The step-memory tracker counts what is allocated, frees what is freed, and shows the logits."""
    with bench.PeakMemory() as tracker:
        a = torch.ones(1000, dtype=torch.float32) * 2
        del a
        b = torch.ones(10, dtype=torch.float32) * 2
    assert tracker.peak >= 4000 and tracker.current < 4000
    del b
    x, y, roles = batch
    w = sftkey.token_weights(roles, STAGES["stage 2"])
    model = _model(vocab_size=4096)
    peaks = {}
    for full in (True, False):
        loss_sum = bench.full_projection_loss_sum if full else sftkey.weighted_loss_sum
        with bench.PeakMemory() as tracker:
            loss_sum(model(x), model.lm_head, y, w).backward()
        peaks[full] = tracker.peak
        model.zero_grad(set_to_none=True)
    assert peaks[True] - peaks[False] >= x.numel() * 4096 * 4  # at least the float32 (B, T, vocab) logits


def test_batches_window_trades_padding_for_mixing():
    enc = D.char_encoding()
    data = D.tokenize(D.synthetic_task(640, seed=5), enc, block_size=96)
    shares = [bench.padding_share(data, 16, window, seed=0) for window in (1, 4, 16)]
    assert shares[0] > shares[1] > shares[2] >= 0
    batches = D.Batches(data, 16, seed=0, window=4)
    epoch = np.concatenate([batches.indices(i) for i in range(batches.per_epoch)])
    assert len(set(epoch.tolist())) == len(epoch) == batches.per_epoch * 16  # each example once per epoch
    with pytest.raises(ValueError, match="window"):
        D.Batches(data, 16, seed=0, window=0)


def test_bench_runs_end_to_end_and_writes_every_figure(tmp_path):
    """The quick configuration, on GSM8K-shaped synthetic text (so it does not need ../shared/gsm8k)."""
    path = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--data", "", "--threads", "1", "--emulated_bf16",
                           "--json", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(path.read_text())
    for key in ("key_step_speedup", "sft_step_speedup", "kv_cache_speedup", "padding_fraction", "bf16_speedup",
                "bf16_speedup_default_model"):
        assert isinstance(out[key], float) and math.isfinite(out[key]) and out[key] > 0, key
    assert out["mfu"] is None  # a CPU has no data-sheet peak: no MFU
    assert out["padding_fraction"] < 1
    assert {"full", "sft", "key"} <= set(out["train_step"])
    assert out["train_step"]["key"]["projected_fraction"] < out["train_step"]["sft"]["projected_fraction"] < 1
    for title in ("Training step", "Greedy generation", "Padding", "Precision"):
        assert title in done.stdout


@pytest.mark.parametrize("flags, message", [
    (["--n_head", "0"], "--n_head 0: must be a whole number >= 1"),  # was a ZeroDivisionError traceback
    (["--n_embd", "33"], "--n_embd 33: must be a multiple of --n_head 2"),  # was an AssertionError traceback
    (["--threads", "-1"], "--threads -1: must be a whole number >= 0"),  # was a RuntimeError traceback
    (["--new_tokens", "0"], "--new_tokens 0: must be a whole number >= 1"),  # was a ZeroDivisionError traceback
    (["--limit", "-5"], "--limit -5: must be a whole number >= 0"),  # was examples[:-5], silently
    (["--dtype", "float16"], "--dtype float16: use auto, float32 or bfloat16"),  # train.py refuses it too
    (["--device", "meta"], "--device meta: not a device this runs on"),  # was a traceback in the first table
    (["--iters", "0", "--batch_size", "0"], "--batch_size 0: must be a whole number >= 1; --iters 0"),
    (["--data", "/dev/null"], "--data /dev/null: not a regular file (a character device)"),  # was "no such file"
    (["--data", os.path.dirname(__file__)], "not a regular file (a folder)"),
    (["--new_tokens", "600"], "--new_tokens 600: prompts of up to"),  # found by attack: a RuntimeError traceback
])
def test_bench_bad_flags_are_one_line_and_exit_2(capsys, flags, message):
    """Found in review: bench.py checked none of its flags; several ended in a traceback, others ran on silently."""
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--data", "", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_bench_refuses_more_threads_than_cpus():
    """Found by attack: --threads 100000 crashed the process (a segfault; thousands: OpenMP failed or hung)."""
    done = subprocess.run([sys.executable, "bench.py", "--quick", "--data", "", "--threads", "100000"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error: --threads 100000: more than this machine's")


def test_bench_json_that_is_not_a_file_is_refused_before_the_run(tmp_path, capsys):
    """Found by attack: --json naming a device or a FIFO ran the whole bench, then replaced it with the JSON file."""
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--data", "", "--json", str(tmp_path / "fifo")])
    assert exit_info.value.code == 2 and "a folder or a device; give a file" in capsys.readouterr().err
    assert (tmp_path / "fifo").is_fifo()


def test_bench_stopped_by_a_signal_is_one_line_and_exit_130(tmp_path):
    """Found by attack: Ctrl-C during bench.py printed a traceback, and SIGTERM while --json was written left its
    partial temporary. Now a stop signal ends it in one line, exit 130, with nothing half-written."""
    child = subprocess.Popen([sys.executable, "bench.py", "--quick", "--data", "", "--threads", "1", "--iters", "1000",
                              "--json", str(tmp_path / "b.json")], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60  # the handlers are in place once torch and the data are loaded
    while child.poll() is None and not catches(child.pid, signal.SIGTERM) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into the timings
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130 and err.startswith("stopped: SIGINT received") and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []
