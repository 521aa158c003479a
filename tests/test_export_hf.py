"""`python gpt2.py export CKPT DIR`: a gpt2-encoding checkpoint exported as a Hugging Face GPT-2 folder, and back.

The round trip is exact: gpt2.gpt2_from_hf on the exported folder gives the checkpoint's weights bit
for bit (the embedding cut to GPT-2's 50,257 rows) and the same logits on every real token. Since a
mistake mirrored in gpt2.py (a missed transpose) would survive a round trip, the exported tensors are
also run through test_pretrained's float64 GPT-2 forward pass, written from Hugging Face's layout alone.
Refused: models of another tokenizer, and replacing files without --overwrite.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import gpt2
import sample
import train
from conftest import needs_tiktoken_cache, run_cli
from test_pretrained import hf_tensors, reference_logits, write_checkpoint

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--block_size", "40", "--n_train", "40", "--n_val", "4",
        "--n_test", "2", "--eval_limit", "1", "--max_iters", "2", "--stage2_iters", "0", "--batch_size", "4",
        "--log_interval", "1000", "--eval_interval", "1000", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory) -> str:
    """A model trained from random weights with GPT-2's tokenizer: its table has 50,304 rows."""
    out = tmp_path_factory.mktemp("gpt2_run")
    train.main([*TINY, "--encoding", "gpt2", "--lr", "1e-2", "--out_dir", str(out)])
    return str(out / "sft_tag" / "ckpt.pt")


def run_export(args: list[str], capsys) -> tuple[int, str, str]:
    return run_cli(gpt2.main, ["export", *args], capsys)


def check_round_trip(ckpt_path: str, folder: str) -> None:
    ckpt = torch.load(ckpt_path, weights_only=True)
    ours, _, _, _ = sample.load(ckpt_path, "cpu")
    back = gpt2.gpt2_from_hf(folder).eval()
    assert back.config.vocab_size == 50257 and back.config.block_size == ours.config.block_size
    state = back.state_dict()
    assert set(state) == set(ckpt["model"])
    for name, tensor in ckpt["model"].items():
        expected = tensor[:50257] if name in ("transformer.wte.weight", "lm_head.weight") else tensor
        assert torch.equal(state[name], expected), name
    ids = torch.randint(0, 50257, (3, ours.config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, hidden_back = ours(ids), back(ids)
        assert torch.equal(hidden, hidden_back)  # the same weights, the same arithmetic: bit for bit
        logits, logits_back = ours.lm_head(hidden)[..., :50257], back.lm_head(hidden_back)
    torch.testing.assert_close(logits_back, logits, rtol=0, atol=1e-6)  # one product, a 50,304- or 50,257-row one
    assert torch.equal(logits.argmax(-1), logits_back.argmax(-1))


@needs_tiktoken_cache
def test_export_round_trips_exactly_and_is_gpt2_layout(gpt2_ckpt, tmp_path, capsys):
    folder = tmp_path / "hf"
    code, out, err = run_export([gpt2_ckpt, str(folder)], capsys)
    assert code == 0, err
    assert "read back with gpt2.gpt2_from_hf: every weight equal" in out
    check_round_trip(gpt2_ckpt, str(folder))

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert {k: config[k] for k in ("vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head")} == \
        {"vocab_size": 50257, "n_positions": 40, "n_ctx": 40, "n_embd": 16, "n_layer": 2, "n_head": 2}
    assert config["activation_function"] == "gelu_new" and config["layer_norm_epsilon"] == 1e-5
    assert config["bos_token_id"] == config["eos_token_id"] == 50256

    saved = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" not in saved and all(k.startswith("transformer.") for k in saved)
    assert saved["transformer.wte.weight"].shape == (50257, 16)
    assert saved["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D: (in, out)
    assert saved["transformer.h.1.mlp.c_proj.weight"].shape == (64, 16)
    # Hugging Face's arithmetic on those tensors (x @ W + b), in float64, independent of model.py and gpt2.py.
    model, _, _, _ = sample.load(gpt2_ckpt, "cpu")
    ids = torch.randint(0, 50257, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.lm_head(model(ids[None]))[0, :, :50257].double()
    ref = reference_logits({k.removeprefix("transformer."): v for k, v in saved.items()}, ids, n_head=2)
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()

    try:
        import safetensors  # noqa: F401
    except ImportError:
        assert not (folder / "model.safetensors").exists()
        assert "pip install safetensors" in out
    else:
        assert (folder / "model.safetensors").exists()


@needs_tiktoken_cache
def test_a_model_trained_from_gpt2_weights_exports_its_50257_rows(tmp_path, capsys):
    source = write_checkpoint(tmp_path / "gpt2", hf_tensors(n_layer=1, n_embd=16, vocab=50257, n_positions=64),
                              n_head=2)
    out, start = tmp_path / "run", str(tmp_path / "gpt2.pt")
    gpt2.main(["import", source, start, "--block_size", "32"])
    train.main([*TINY, "--encoding", "gpt2", "--init_from", start, "--n_layer", "1", "--n_head", "2", "--n_embd", "16",
                "--block_size", "32", "--lr", "1e-3", "--out_dir", str(out)])
    capsys.readouterr()
    ckpt = str(out / "sft_tag" / "ckpt.pt")
    code, _, err = run_export([ckpt, str(tmp_path / "hf"), "--activation", "gelu_pytorch_tanh"], capsys)
    assert code == 0, err
    check_round_trip(ckpt, str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "gelu_pytorch_tanh"


def test_another_tokenizer_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    train.main([*TINY, "--out_dir", str(out)])  # sftkey-chars
    capsys.readouterr()
    code, stdout, err = run_export([str(out / "sft_tag" / "ckpt.pt"), str(tmp_path / "hf")], capsys)
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert err.startswith("error: ") and "trained with encoding sftkey-chars, not gpt2" in err
    assert not (tmp_path / "hf").exists()


@needs_tiktoken_cache
def test_existing_files_are_never_replaced_without_overwrite(gpt2_ckpt, tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"an older export")
    (folder / "tokenizer.json").write_text("kept")  # not ours: never touched
    code, stdout, err = run_export([gpt2_ckpt, str(folder)], capsys)
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert "already holds config.json, model.safetensors: give --overwrite" in err
    assert (folder / "config.json").read_text() == "{}" and not (folder / "pytorch_model.bin").exists()

    code, out, err = run_export([gpt2_ckpt, str(folder), "--overwrite"], capsys)
    assert code == 0, err
    # model.safetensors was rewritten, or (no safetensors package) removed: an old one would shadow the export
    assert not (folder / "model.safetensors").exists() or (folder / "model.safetensors").read_bytes() != \
        b"an older export"
    assert (folder / "tokenizer.json").read_text() == "kept"
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]
    check_round_trip(gpt2_ckpt, str(folder))

    code, _, err = run_export([gpt2_ckpt, str(folder)], capsys)  # a finished export is not replaced either
    assert code == 2 and "already holds config.json, pytorch_model.bin" in err


def test_an_overwrite_stopped_half_way_leaves_no_config_json_to_pass_it_off_as_whole(gpt2_ckpt, tmp_path, capsys,
                                                                                     monkeypatch):
    """Found by trying: a Ctrl-C after the new weights left the old config.json beside them, another model's."""
    folder = tmp_path / "hf"
    assert run_export([gpt2_ckpt, str(folder)], capsys)[0] == 0
    written = []

    def stopped_after_one(path, write):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        return original(path, write)
    original = gpt2.ckpts.atomic_write
    monkeypatch.setattr(gpt2.ckpts, "atomic_write", stopped_after_one)
    code, _, err = run_export([gpt2_ckpt, str(folder), "--overwrite"], capsys)
    assert code == 130 and err == "stopped: interrupted\n"  # was "stopped: " alone
    assert written and not (folder / "config.json").exists()  # transformers refuses the folder: not whole


def test_files_that_would_shadow_an_export_are_gone_before_its_config_json_is_written(gpt2_ckpt, tmp_path, capsys,
                                                                                        monkeypatch):
    """A stop just before config.json must not leave an index file beside it that loaders read instead."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "pytorch_model.bin.index.json").write_text("{}")  # an older, sharded export's
    seen = []
    monkeypatch.setattr(gpt2.ckpts, "write_json", lambda path, obj: seen.append(os.listdir(folder)))
    assert run_export([gpt2_ckpt, str(folder), "--overwrite"], capsys)[0] != 0  # verify finds no config.json
    assert seen and "pytorch_model.bin.index.json" not in seen[0]


def test_bad_paths_are_one_line_errors(gpt2_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found in review: an empty HF_DIR wrote, and with --overwrite deleted, files here
    (tmp_path / "model.safetensors").write_bytes(b"someone else's")
    for args, message in [([str(tmp_path / "absent.pt"), str(tmp_path / "hf")], "absent.pt: no such file"),
                          ([__file__, str(tmp_path / "hf")], "test_export_hf.py: "),
                          ([gpt2_ckpt, "", "--overwrite"], "give a folder for the Hugging Face files")]:
        code, stdout, err = run_export(args, capsys)
        assert code == 2 and stdout == "" and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == ["model.safetensors"] and not os.path.exists(tmp_path / "hf")
    code, _, err = run_cli(gpt2.main, ["import", str(tmp_path), ""], capsys)  # no file name to write
    assert code == 2 and "and a file for the checkpoint" in err and os.listdir(tmp_path) == ["model.safetensors"]


def test_the_checkpoint_read_is_never_the_file_written(gpt2_ckpt, tmp_path, capsys):
    """Found by attack: `export DIR/pytorch_model.bin DIR --overwrite` replaced the trained checkpoint (optimizer,
    log and all) with the export, and `import DIR DIR/pytorch_model.bin --overwrite` the Hugging Face weights with a
    checkpoint, both exit 0. By any name (a hard link too): refused before anything is written."""
    folder = tmp_path / "hf"
    folder.mkdir()
    os.link(gpt2_ckpt, folder / "pytorch_model.bin")
    before = (folder / "pytorch_model.bin").read_bytes()
    code, _, err = run_export([gpt2_ckpt, str(folder), "--overwrite"], capsys)
    assert code == 2 and "the same file" in err and err.count("\n") == 1
    assert (folder / "pytorch_model.bin").read_bytes() == before and os.listdir(folder) == ["pytorch_model.bin"]
    exported = tmp_path / "exported"
    assert run_export([gpt2_ckpt, str(exported)], capsys)[0] == 0
    bin_file = exported / "pytorch_model.bin"
    before = bin_file.read_bytes()
    code, _, err = run_cli(gpt2.main, ["import", str(exported), str(bin_file), "--overwrite"], capsys)
    assert code == 2 and "the same file" in err and bin_file.read_bytes() == before


def test_a_folder_or_device_where_a_file_goes_is_refused_before_anything_is_written(gpt2_ckpt, tmp_path, capsys):
    """Found by attack: a folder named pytorch_model.bin in HF_DIR failed the write (exit 1) after --overwrite had
    deleted the old config.json; a folder named model.safetensors.index.json, after pytorch_model.bin was written;
    `import ... DEVICE --overwrite` replaced the device node (as root) with a checkpoint. Now exit 2, nothing touched."""
    folder = tmp_path / "hf"
    assert run_export([gpt2_ckpt, str(folder)], capsys)[0] == 0
    (folder / "model.safetensors.index.json").mkdir()
    listing = sorted(os.listdir(folder))
    code, _, err = run_export([gpt2_ckpt, str(folder), "--overwrite"], capsys)
    assert code == 2 and "model.safetensors.index.json: not a file" in err and sorted(os.listdir(folder)) == listing
    os.mkfifo(tmp_path / "fifo.pt")
    for target in (tmp_path / "fifo.pt", folder / "model.safetensors.index.json"):
        code, _, err = run_cli(gpt2.main, ["import", str(folder), str(target), "--overwrite"], capsys)
        assert code == 2 and f"{target}: not a file" in err
    assert (tmp_path / "fifo.pt").is_fifo()


def test_a_stop_signal_waits_for_the_file_being_written_and_leaves_no_temporary(gpt2_ckpt, tmp_path, capsys):
    """Found by attack: SIGTERM during an export's torch.save killed the process and left its partial temporary
    (`.pytorch_model.bin.*.tmp`); Ctrl-C there became "could not write: the write failed", exit 1. Now any stop
    signal is held until the file is whole, then ends the command in one line, exit 130."""
    import signal
    folder, saved = tmp_path / "hf", gpt2.torch.save

    def signalled(obj, f):
        if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:  # else it would kill pytest as it killed the command
            os.kill(os.getpid(), signal.SIGTERM)  # inside the write
        saved(obj, f)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpt2.torch, "save", signalled)
        code, _, err = run_export([gpt2_ckpt, str(folder)], capsys)
    assert code == 130 and err.splitlines()[-1].startswith("stopped: SIGTERM received")
    assert sorted(os.listdir(folder)) == ["config.json", "pytorch_model.bin"]  # finished, whole, no temporary
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers put back
