"""gpt2.gpt2_from_hf, `python gpt2.py import` and --init_from its checkpoint, on small random checkpoints in
Hugging Face's layout.

The checkpoints are built here tensor by tensor with GPT-2's names and shapes (Conv1D weights
stored as (in, out), the attention-mask buffers, with or without the "transformer." prefix), so
the tests need neither `transformers` nor a download. The logits are checked against a float64
forward pass written directly from those tensors, independent of model.py.
"""
import json
import math
import os
import re

import pytest
import torch

import gpt2
import train
from conftest import run_cli

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_tensors(n_layer: int, n_embd: int, vocab: int, n_positions: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """GPT-2's tensors under Hugging Face's names (no prefix), random, with the mask buffers."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=0.1, mean=0.0: mean + std * torch.randn(*shape, generator=g)  # noqa: E731
    C = n_embd
    t = {"wte.weight": rand(vocab, C, std=0.3), "wpe.weight": rand(n_positions, C, std=0.1),
         "ln_f.weight": rand(C, mean=1.0), "ln_f.bias": rand(C)}
    for i in range(n_layer):
        p = f"h.{i}."
        t.update({p + "ln_1.weight": rand(C, mean=1.0), p + "ln_1.bias": rand(C),
                  p + "attn.c_attn.weight": rand(C, 3 * C, std=0.3), p + "attn.c_attn.bias": rand(3 * C),
                  p + "attn.c_proj.weight": rand(C, C), p + "attn.c_proj.bias": rand(C),
                  p + "ln_2.weight": rand(C, mean=1.0), p + "ln_2.bias": rand(C),
                  p + "mlp.c_fc.weight": rand(C, 4 * C), p + "mlp.c_fc.bias": rand(4 * C),
                  p + "mlp.c_proj.weight": rand(4 * C, C), p + "mlp.c_proj.bias": rand(C),
                  # buffers that Hugging Face saves with the weights; they are not parameters
                  p + "attn.bias": torch.ones(n_positions, n_positions).tril().view(1, 1, n_positions, n_positions),
                  p + "attn.masked_bias": torch.tensor(-1e4)})
    return t


def write_checkpoint(folder, tensors: dict, prefix: bool = False, n_head: int | None = None,
                     extra_config: dict | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    saved = {("transformer." if prefix else "") + k: v for k, v in tensors.items()}
    torch.save(saved, os.path.join(folder, "pytorch_model.bin"))
    if n_head is not None:
        n_positions, n_embd = tensors["wpe.weight"].shape
        config = {"model_type": "gpt2", "n_head": n_head, "n_embd": n_embd, "n_positions": n_positions,
                  "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, **(extra_config or {})}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
    return str(folder)


def reference_logits(t: dict[str, torch.Tensor], ids: torch.Tensor, n_head: int) -> torch.Tensor:
    """GPT-2's forward pass in float64, straight from the Hugging Face tensors (Conv1D: x @ W + b)."""
    t = {k: v.double() for k, v in t.items()}

    def layer_norm(x, name):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * t[name + ".weight"] + t[name + ".bias"]

    def gelu(x):  # GPT-2's tanh approximation
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    T, C = ids.numel(), t["wte.weight"].shape[1]
    d = C // n_head
    x = t["wte.weight"][ids] + t["wpe.weight"][:T]
    n_layer = len({k.split(".")[1] for k in t if k.startswith("h.")})
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(n_layer):
        p = f"h.{i}."
        qkv = layer_norm(x, p + "ln_1") @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
        q, k, v = (qkv[:, j * C:(j + 1) * C].reshape(T, n_head, d).transpose(0, 1) for j in range(3))
        scores = (q @ k.transpose(1, 2) / math.sqrt(d)).masked_fill(~causal, float("-inf"))
        y = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(T, C)
        x = x + y @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
        hidden = gelu(layer_norm(x, p + "ln_2") @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"])
        x = x + hidden @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
    return layer_norm(x, "ln_f") @ t["wte.weight"].T


@pytest.mark.parametrize("prefix", [False, True])
def test_load_is_exact_and_logits_match_the_reference(tmp_path, prefix):
    tensors = hf_tensors(n_layer=2, n_embd=32, vocab=97, n_positions=40)
    model = gpt2.gpt2_from_hf(write_checkpoint(tmp_path, tensors, prefix=prefix, n_head=4))
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size) == (2, 4, 32, 97, 40)
    ours = model.state_dict()
    for name, tensor in tensors.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            assert "transformer." + name not in ours
            continue
        expected = tensor.T if name.endswith(CONV1D) else tensor
        assert torch.equal(ours["transformer." + name], expected), name
    loaded = {"transformer." + k for k in tensors if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert set(ours) == loaded | {"lm_head.weight"}
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, not a copy
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())

    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        logits = model.lm_head(model(ids[None]))[0].double()
    ref = reference_logits(tensors, ids, n_head=4)
    # float32 rounding through two layers: errors of order 1e-6 relative to the logits' scale
    err = (logits - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err
    # and the loaded model actually differs from position to position (the check is not vacuous)
    assert ref.std(0).min() > 0.1


def test_block_size_crops_the_position_table_and_cannot_grow_it(tmp_path):
    tensors = hf_tensors(n_layer=1, n_embd=16, vocab=50, n_positions=32)
    folder = write_checkpoint(tmp_path, tensors, n_head=2)
    full, cropped = gpt2.gpt2_from_hf(folder), gpt2.gpt2_from_hf(folder, block_size=12)
    assert cropped.config.block_size == 12
    assert torch.equal(cropped.transformer.wpe.weight, tensors["wpe.weight"][:12])
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(full(ids), cropped(ids))
    with pytest.raises(ValueError, match="block_size 33 exceeds the 32 positions"):
        gpt2.gpt2_from_hf(folder, block_size=33)


def test_n_head_from_gpt2_table_without_config_json(tmp_path):
    # GPT-2 small's width with a tiny vocabulary and one layer: the head count comes from the table.
    folder = write_checkpoint(tmp_path / "small", hf_tensors(n_layer=1, n_embd=768, vocab=8, n_positions=4))
    assert gpt2.gpt2_from_hf(folder).config.n_head == 12
    odd = write_checkpoint(tmp_path / "odd", hf_tensors(n_layer=1, n_embd=24, vocab=8, n_positions=4))
    with pytest.raises(ValueError, match="n_head"):
        gpt2.gpt2_from_hf(odd)


class Opens:
    """Pickles as a call of open(path, "w"): what a checkpoint must never get to run."""
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_clear_errors_for_bad_folders_and_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        gpt2.gpt2_from_hf(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        gpt2.gpt2_from_hf(str(tmp_path))

    tensors = hf_tensors(n_layer=2, n_embd=16, vocab=30, n_positions=8)
    missing = dict(tensors)
    del missing["h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing \['h.1.mlp.c_fc.bias'\]"):
        gpt2.gpt2_from_hf(write_checkpoint(tmp_path / "missing", missing, n_head=2))
    untied = {**tensors, "lm_head.weight": tensors["wte.weight"] + 1}
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        gpt2.gpt2_from_hf(write_checkpoint(tmp_path / "untied", untied, n_head=2))
    with pytest.raises(ValueError, match="activation_function"):
        gpt2.gpt2_from_hf(write_checkpoint(tmp_path / "relu", tensors, n_head=2,
                                             extra_config={"activation_function": "relu"}))
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a checkpoint of tensors"):
        gpt2.gpt2_from_hf(str(tmp_path / "garbage"))
    # Found in review: a pickled call was refused with torch's first line, how to load it anyway, in escape codes.
    (tmp_path / "evil").mkdir()
    torch.save({"wte.weight": Opens(str(tmp_path / "pwned"))}, tmp_path / "evil" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="something other than tensors; unpickling it could run code") as refusal:
        gpt2.gpt2_from_hf(str(tmp_path / "evil"))
    assert "\x1b" not in str(refusal.value) and "two options" not in str(refusal.value)
    assert not (tmp_path / "pwned").exists()
    # Found in review: odd config.json values ended in tracebacks, or (2.0, true) in a checkpoint nothing accepts.
    for config, problem in [("[1]", "not a JSON object of settings"), ("{", "not valid JSON"),
                            (b"\xff", "not valid JSON"), ('{"n_head": 0}', "n_head 0 is not a whole number >= 1"),
                            ('{"n_head": "2"}', "n_head '2' is not"), ('{"n_head": 2.0}', "n_head 2.0 is not"),
                            ('{"n_head": true}', "n_head True is not")]:
        folder = write_checkpoint(tmp_path / "odd_config", tensors)
        config_file = os.path.join(folder, "config.json")
        open(config_file, "wb").write(config if isinstance(config, bytes) else config.encode())
        with pytest.raises(ValueError, match=re.escape(f"{config_file}: {problem}")):
            gpt2.gpt2_from_hf(folder)
    # Found by trying: each was imported with exit 0 (NaN, meta: a checkpoint every command then refused, or a
    # traceback), or ended in an error that named nothing (a 1-D wte), or one of two tensors won silently.
    for name, spoilt, problem in [
            ("nan", {**tensors, "ln_f.bias": torch.full((16,), float("nan"))}, "tensor ln_f.bias is not finite"),
            ("meta", {k: v.to("meta") for k, v in tensors.items()}, "not finite real numbers held in memory"),
            ("complex", {**tensors, "wte.weight": tensors["wte.weight"].to(torch.complex64)}, "tensor wte.weight"),
            ("wte1d", {**tensors, "wte.weight": tensors["wte.weight"][0]}, "wte.weight is not a table of rows"),
            ("wpe0", {**tensors, "wpe.weight": tensors["wpe.weight"][:0]}, "wpe.weight is not a table of rows")]:
        with pytest.raises(ValueError, match=problem):
            gpt2.gpt2_from_hf(write_checkpoint(tmp_path / name, spoilt))
    both = write_checkpoint(tmp_path / "both", tensors)
    torch.save({**tensors, "transformer.ln_f.weight": tensors["ln_f.weight"] + 6},
               os.path.join(both, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="given twice, with and without the prefix"):
        gpt2.gpt2_from_hf(both)
    tied = {**tensors, "lm_head.weight": tensors["wte.weight"].clone()}  # a tied copy is fine
    assert gpt2.gpt2_from_hf(write_checkpoint(tmp_path / "tied", tied, n_head=2)).config.n_layer == 2


def test_safetensors_file_loads_or_names_the_missing_package(tmp_path):
    tensors = hf_tensors(n_layer=1, n_embd=16, vocab=30, n_positions=8)
    try:
        from safetensors.torch import save_file
    except ImportError:  # the package is optional: the error must say what to install
        (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
        with pytest.raises(FileNotFoundError, match="pip install safetensors"):
            gpt2.gpt2_from_hf(str(tmp_path))
        return
    save_file({"transformer." + k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 2}))
    model = gpt2.gpt2_from_hf(str(tmp_path))
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, tensors["h.0.attn.c_attn.weight"].T)


TAGGED = [{"prompt": f"What is {a} plus {b}?", "thinking": f"{a} + {b} = {a + b}", "answer": str(a + b)}
          for a, b in [(2, 3), (10, 7), (4, 4), (21, 9), (6, 13), (8, 1), (30, 12), (5, 5), (17, 3), (11, 11)]]


def test_gpt2_import_then_init_from_trains_both_stages_and_keeps_the_checkpoint_shape(tmp_path, capsys,
                                                                                      gpt2_encoding):
    vocab = gpt2_encoding.n_vocab  # 50257: a real GPT-2 vocabulary, never rounded up
    folder = write_checkpoint(tmp_path / "gpt2", hf_tensors(n_layer=1, n_embd=16, vocab=vocab, n_positions=64),
                              n_head=2)
    start = str(tmp_path / "gpt2.pt")
    code, out, err = run_cli(gpt2.main, ["import", folder, start, "--block_size", "32"], capsys)
    shape = ["--encoding", "gpt2", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "32"]
    assert code == 0 and f"--init_from {start} {' '.join(shape)}" in out, err
    imported = torch.load(start, weights_only=True)
    assert imported["model_config"]["vocab_size"] == vocab and imported["step"] == 0
    cropped = gpt2.gpt2_from_hf(folder, 32).transformer.wpe.weight
    assert torch.equal(imported["model"]["transformer.wpe.weight"], cropped)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in TAGGED) + "\n")
    common = ["--data", str(data), "--format", "tagged", "--eval_data", str(data), "--batch_size", "4", "--n_val", "1",
              "--eval_limit", "1", "--log_interval", "1", "--eval_interval", "100", "--device", "cpu",
              "--dtype", "float32"]
    out_dir = tmp_path / "out"
    train.main(common + shape + ["--init_from", start, "--max_iters", "2", "--stage2_iters", "1",
                                 "--out_dir", str(out_dir)])
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results["results"]) == {"sft_tag", "sftkey_tag"}
    ckpt = torch.load(out_dir / "sft_tag" / "ckpt.pt", weights_only=True)
    assert {k: ckpt["model_config"][k] for k in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head")} == \
        {"vocab_size": vocab, "block_size": 32, "n_layer": 1, "n_embd": 16, "n_head": 2}

    # Stage 2 by hand from that checkpoint: its 50257-token vocabulary is accepted as it is.
    train.main(common + shape + ["--init_from", str(out_dir / "sft_tag" / "ckpt.pt"), "--key_only",
                                 "--max_iters", "1", "--stage2_iters", "0", "--out_dir", str(tmp_path / "by_hand")])
    assert "sftkey_tag" in json.loads((tmp_path / "by_hand" / "results.json").read_text())["results"]

    # Flags that disagree with the imported checkpoint are refused by name, before anything is written.
    for flags, message in [(["--encoding", "cl100k_base"], "--encoding: gpt2 in the checkpoint but cl100k_base"),
                           # named before the data: with this encoding the examples are too long for block 32
                           (["--encoding", "sftkey-chars"], "--encoding: gpt2 in the checkpoint but sftkey-chars"),
                           (["--n_layer", "3"], "--n_layer: n_layer=1 in the checkpoint but 3 here"),
                           (["--block_size", "64"], "--block_size: block_size=32 in the checkpoint but 64 here")]:
        code, _, err = run_cli(train.main, common + shape + flags + ["--init_from", start, "--max_iters", "1",
                                                                    "--out_dir", str(tmp_path / "bad")], capsys)
        assert code == 2 and message in err, err
        assert not (tmp_path / "bad").exists()
    # The importer's own refusals: one line, exit 2, no file written.
    for args, message in [([folder, str(tmp_path / "long.pt"), "--block_size", "65"], "block_size 65 exceeds the 64"),
                          ([str(tmp_path / "nowhere"), str(tmp_path / "none.pt")], "no such directory"),
                          ([folder, start], "exists: give --overwrite"),
                          ([folder, str(tmp_path / "long.pt"), "--block_size", "0"], "--block_size 0 must be >= 1"),
                          ([folder, str(tmp_path / "long.pt"), "--dropout", "1"], "--dropout 1.0 must lie in [0, 1)")]:
        code, out, err = run_cli(gpt2.main, ["import", *args], capsys)
        assert code == 2 and out == "" and message in err and err.count("\n") == 1, err
        assert "None" not in err  # found in review: a bad --dropout also printed "--block_size None"
    assert not (tmp_path / "long.pt").exists() and not (tmp_path / "none.pt").exists()
    assert run_cli(gpt2.main, ["import", folder, start, "--overwrite"], capsys)[0] == 0
