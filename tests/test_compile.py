"""--compile: the same training as eager, and one compilation for all the batch widths.

Inductor's C++ build takes minutes on a small shared CPU (and "aot_eager" 50 s for the first step
here), so the test compiles with the "eager" backend (SFTKEY_COMPILE_BACKEND): Dynamo's graph
capture, its shape guards and its recompilation decisions, which are what this test is about, are
the same as under inductor; the kernels are PyTorch's own. tests/test_cuda.py compiles with
inductor where a GPU is present.
"""
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import data as D
import runtime
import train

FLAGS = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8", "--n_train", "300",
         "--n_val", "20", "--n_test", "4", "--max_iters", "10", "--stage2_iters", "4", "--warmup_iters", "2",
         "--log_interval", "5", "--eval_interval", "100", "--dtype", "float32", "--device", "cpu"]


def _run(out_dir, *extra: str) -> dict:
    train.run(train.parse_args([*FLAGS, "--out_dir", str(out_dir), *extra]))
    return torch.load(out_dir / "sftkey_tag" / "ckpt.pt", weights_only=True)["model"]


def test_compiled_run_matches_eager_without_recompiling_per_width(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.COMPILE_BACKEND, "eager")
    widths = set()
    original = D.Batches.get

    def get(self, i, device, **split):
        batch = original(self, i, device, **split)
        widths.add(batch[0].size(1))
        return batch
    monkeypatch.setattr(D.Batches, "get", get)
    eager = _run(tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = _run(tmp_path / "compiled", "--compile")
    assert len(widths) >= 4  # the batches really vary in width
    # One graph for every width, both stages: static shapes would have compiled once per width.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)
    moved = max(float((eager[n] - _initial(tmp_path)[n]).abs().max()) for n in eager)
    assert moved > 1e-3  # the runs trained, so agreeing means something


def _initial(tmp_path) -> dict:
    """Stage 1's starting weights: the same seed builds the same model."""
    cfg = train.parse_args([*FLAGS, "--out_dir", str(tmp_path / "init")])
    torch.manual_seed(cfg.seed)
    from checkpoints import build_model
    return build_model(cfg, D.get_encoding(cfg.encoding), "cpu").state_dict()
