"""Nothing mixes devices, checked on a machine without a GPU.

A CUDA run fails when a tensor is made on the CPU by default (no `device=`) and then meets the
model's tensors. Here the run is on the CPU while the *default* device is `meta`: every tensor
created without naming its device lands on `meta`, and the first operation mixing it with the
CPU tensors fails exactly as it would on a GPU ("Expected all tensors to be on the same device",
or "Cannot copy out of meta tensor"). The training loop, validation, the meter, checkpoints,
generation, evaluation and bench.py's timed functions run like that; the collectives of a
two-rank job are stood in for by a `Dist` that checks where each tensor lives.
"""
import pytest
import torch

import bench
import checkpoints
import data as D
import runtime
import sftkey
import train
from model import GPT, GPTConfig

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8", "--n_train", "100",
        "--n_val", "10", "--n_test", "4", "--max_iters", "3", "--warmup_iters", "1", "--log_interval", "1",
        "--eval_interval", "2", "--dtype", "float32", "--device", "cpu", "--dropout", "0.1", "--ckpt_interval", "1"]


class CheckedDist(runtime.Dist):
    """Two ranks as far as the loop can tell; every collective's tensor must be on `device`."""

    def __init__(self):
        super().__init__(rank=0, world=2, local_rank=0, device="cpu")
        self.reduced: list[torch.device] = []

    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        self.reduced.append(value.device)
        assert value.device == torch.device(self.device), value.device
        return value

    def wrap(self, model, device):
        return model

    def gather(self, value) -> list:
        return [value] * self.world

    def no_sync(self, net, last_micro_batch):
        return runtime.contextlib.nullcontext()


def _setup(tmp_path, *extra):
    cfg = train.parse_args([*TINY, "--out_dir", str(tmp_path), *extra])
    enc = D.get_encoding(cfg.encoding)
    train_set, val_set, test = D.load_data(cfg, enc)
    torch.manual_seed(0)
    return cfg, enc, train_set, val_set, test, checkpoints.build_model(cfg, enc, "cpu")


@pytest.mark.parametrize("dist", [None, "two ranks"])
def test_loop_validation_checkpoints_and_evaluation_name_their_device(tmp_path, dist):
    cfg, enc, train_set, val_set, test, model = _setup(tmp_path)
    checked = CheckedDist() if dist else runtime.Dist()
    log: list[dict] = []
    path = str(tmp_path / "sft_tag" / "ckpt.pt")
    with runtime.StopSignal() as stop, torch.device("meta"):
        ckpt = checkpoints.StageCheckpoint(path, cfg, "sft_tag", log, stop=stop, dist=checked)
        optimizer = train.train(model, train_set, val_set, cfg, sftkey.Stage("sft_tag", sftkey.role_weights(), 3, 1e-3),
                                "cpu", torch.float32, log, ckpt=ckpt, dist=checked, peak_flops=1e15)
        ckpt.save(3, model, optimizer)  # the end-of-stage write (run() does it)
        result = train.evaluate(model, enc, test, cfg, "cpu", torch.float32)
        saved = checkpoints.read_checkpoint(path, model.config, "cpu")
        checkpoints.restore_rng(saved)
        resumed = checkpoints.StageCheckpoint(path, cfg, "sft_tag", log, saved, dist=checked)
        optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")
        assert resumed.restore(optimizer) == 3
    assert result["n"] == len(test) and saved["step"] == 3
    losses = [row["loss"] for row in log if "loss" in row]
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # finite numbers, nothing on meta
    assert all(row.get("mfu") is not None for row in log if "loss" in row)
    if dist:  # the loop's weight sum, the meter's loss and counts, and the stop flag went through it
        assert len(checked.reduced) >= 3 * 3


def test_the_old_device_mixing_counter_is_caught_here(tmp_path, monkeypatch):
    """The check can fail: the counter line of issue 16, put back, fails under it as it did on CUDA."""
    cfg, enc, train_set, val_set, test, model = _setup(tmp_path)

    def old_count(self, roles, weights):
        counts = torch.stack([(roles != sftkey.PAD).sum(), torch.tensor(roles.numel()), (weights != 0).sum()])
        self.real += counts[0]
    monkeypatch.setattr(runtime.Meter, "count", old_count)
    with torch.device("meta"), pytest.raises(RuntimeError, match="device meta is not on the expected device cpu"):
        train.train(model, train_set, val_set, cfg, sftkey.Stage("sft_tag", sftkey.role_weights(), 1, 1e-3), "cpu",
                    torch.float32, [])


def test_bench_steps_and_generation_name_their_device():
    enc = D.char_encoding()
    data = D.tokenize(D.synthetic_task(8, seed=1), enc, block_size=96)
    model = GPT(GPTConfig(vocab_size=320, block_size=96, n_layer=1, n_head=2, n_embd=32))
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")
    batch = D.collate(data.ids, data.roles, "cpu")
    prompts = [enc.encode_ordinary(ex.prompt + sftkey.PROMPT_SEP) for ex in data.examples[:3]]
    with torch.device("meta"):
        w = sftkey.token_weights(batch[2], sftkey.role_weights())
        for full in (True, False):
            bench.train_step(model, optimizer, batch, w, full, "cpu", torch.float32)()
        for use_cache in (True, False):
            bench.generation(model, prompts, 4, use_cache, "cpu", torch.float32, D.generable_ids(enc, 320))()
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())


@pytest.fixture
def backend_flags():
    """set_up_device changes process-wide backend flags: put them back after the test."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.cudnn_sdp_enabled())
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.backends.cuda.enable_cudnn_sdp(saved[2])


def test_cuda_set_up_keeps_attention_off_cudnn(backend_flags):
    """On an H200 PyTorch picked cuDNN attention, which builds a plan per new batch width (185 ms
    for a GPT-2-small step on a new width, 40 ms with flash): a CUDA run turns it off. The flags
    need no GPU, so this runs everywhere; tests/test_cuda.py checks the kernel a CUDA step runs."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    runtime.set_up_device(train.TrainConfig(device="cpu"))
    assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU run leaves the CUDA flags alone
    runtime.set_up_device(train.TrainConfig(device="cuda", dtype="float32"))
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.matmul.allow_tf32


def test_auto_dtype_is_bf16_only_where_the_hardware_multiplies_it_and_the_model_is_wide(monkeypatch):
    """--dtype auto: bfloat16 on a GPU with native bf16, and on such a CPU from --n_embd 256 (bench.py: 0.7x float32's
    speed at width 128, faster at 384); float32 without native bf16. --dtype given is taken as it is."""
    def resolved(native, **flags):
        monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
        return runtime.resolve_device(train.TrainConfig(**{"device": "cpu", "dtype": "auto", **flags}))
    assert resolved(True, n_embd=256) == ("cpu", torch.bfloat16)
    assert resolved(True, n_embd=192) == ("cpu", torch.float32)  # 192 wide: float32 is faster
    assert resolved(True, n_embd=384) == ("cpu", torch.bfloat16)
    assert resolved(False, n_embd=1024) == ("cpu", torch.float32)
    assert resolved(True, device="cuda", n_embd=32) == ("cuda", torch.bfloat16)
    assert resolved(True, n_embd=32, dtype="bfloat16") == ("cpu", torch.bfloat16)
    assert resolved(True, n_embd=1024, dtype="float32") == ("cpu", torch.float32)


def test_each_rank_of_a_job_uses_the_gpu_of_its_local_rank():
    """Rank 5 of two 4-GPU machines is the second one's local rank 1: cuda:1 (its node has no cuda:5)."""
    dist = runtime.Dist(rank=5, world=8, local_rank=1, device="cuda:1")
    cfg = train.TrainConfig(device="cuda", dtype="float32")
    assert runtime.resolve_device(cfg, dist) == ("cuda:1", torch.float32)
    assert runtime.resolve_device(cfg, runtime.Dist()) == ("cuda", torch.float32)  # one process: as given
    assert runtime.resolve_device(train.TrainConfig(device="cpu", dtype="float32"), dist) == ("cpu", torch.float32)


def test_device_name_is_the_cpu_model_linux_gives_or_platforms_guess(tmp_path, monkeypatch):
    """results.json records the machine (runtime.machine): the CPU model from /proc/cpuinfo, and where that file
    is missing or names no model (macOS, a container), platform's guess rather than an error; a GPU's own name."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t: avx2\n")
    assert runtime.device_name("cpu", str(cpuinfo)) == "Some CPU 9000"
    monkeypatch.setattr(runtime.platform, "processor", lambda: "arm")
    for text in ("processor\t: 0\n", "model name\n", "model name\t: \n"):  # no model, no colon, empty
        cpuinfo.write_text(text)
        assert runtime.device_name("cpu", str(cpuinfo)) == "arm"
    assert runtime.device_name("cpu", str(tmp_path / "missing")) == "arm"
    monkeypatch.setattr(runtime.platform, "processor", lambda: "")
    assert runtime.device_name("cpu", str(tmp_path / "missing")) == "CPU"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU of {device}")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    found = runtime.machine("cuda:1", torch.bfloat16)
    assert (found["device"], found["cuda"], found["dtype"]) == ("GPU of cuda:1", "12.8", "bfloat16")
