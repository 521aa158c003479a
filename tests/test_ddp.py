"""DistributedDataParallel: two CPU ranks (gloo) train the weights of one process that sees the same global batch.

They do because the loss is normalised by the supervised weight summed over all ranks.
"""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--n_train", "300", "--n_val", "20",
         "--n_test", "4", "--max_iters", "6", "--stage2_iters", "3", "--warmup_iters", "1", "--log_interval", "2",
         "--eval_interval", "100", "--dtype", "float32", "--device", "cpu", "--batch_size", "4"]


def _run(command: list[str], out_dir) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command + FLAGS + ["--out_dir", str(out_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(os.path.join(out_dir, "sftkey_tag", "ckpt.pt"), weights_only=True)["model"]


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    single = _run([sys.executable, "train.py", "--grad_accum", "2"], tmp_path / "single")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]  # a free port
    ddp = _run(torchrun + ["train.py", "--grad_accum", "1"], tmp_path / "ddp")
    assert single.keys() == ddp.keys()
    for name in single:
        assert torch.allclose(single[name], ddp[name], atol=1e-5, rtol=1e-4), name
    # Each rank draws its own dropout masks (its own seed; DDP copies rank 0's weights): found in review, every rank
    # had the same RNG state, so with --dropout the ranks repeated each other's noise.
    ranks = torch.load(tmp_path / "ddp" / "sftkey_tag" / "ckpt.pt", weights_only=True)["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["rng"], ranks[1]["rng"])
    # The comparison can fail: one process on half the global batch ends elsewhere.
    half = _run([sys.executable, "train.py", "--grad_accum", "1"], tmp_path / "half")
    assert max(float((half[n] - single[n]).abs().max()) for n in single) > 1e-3


def test_only_train_py_under_torchrun_skips_the_interpreters_teardown():
    """A torchrun worker of train.py ends with os._exit once its files are written (gloo's threads could abort the
    teardown, and torchrun then said 1). Found in review: the first version did so for any command with RANK in the
    environment, so show.main or a test calling it ended the calling process, exit 0, the rest unrun."""
    code = "import runtime; runtime.command(lambda: print('worked', flush=True)); print('AFTER')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "RANK": "0"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["worked", "AFTER"], done.stderr[-2000:]
