"""sample.py: a checkpoint's replies to prompts of one's own.

On a tiny checkpoint trained here for a few steps: greedy replies are exactly `GPT.generate`'s (the
evaluation's decoding) for each prompt alone, whatever the batch; sampling is reproducible from its
seed, never picks an id outside `allowed`, and at top_k 1 is greedy; the printed format and answer are
sftkey's. Bad input ends in one line and exit code 2, with nothing on stdout.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os

import pytest
import torch

import data as D
import experiment
import runtime
import sample
import sftkey
import train
from model import GPT

PROMPTS = ["Q: 7+5-3", "Q: 2+2", "Q: 12+1-4+3+8"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("run")
    train.main(["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "48", "--n_train", "300",
                "--n_val", "10", "--n_test", "2", "--eval_limit", "1", "--max_iters", "40", "--stage2_iters", "0",
                "--batch_size", "16", "--lr", "1e-2", "--warmup_iters", "0", "--log_interval", "1000",
                "--eval_interval", "1000", "--device", "cpu", "--dtype", "float32", "--out_dir", str(out)])
    return str(out / "sft_tag" / "ckpt.pt")


@pytest.fixture(scope="module")
def loaded(ckpt):
    return sample.load(ckpt, "cpu")


def test_load_gives_the_trained_weights_and_tokenizer(ckpt, loaded):
    model, enc, tagged, dtype = loaded
    saved = torch.load(ckpt, weights_only=True)
    assert enc.name == D.SYNTHETIC_ENCODING and tagged and not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["model"].items())


def test_greedy_is_generate_for_each_prompt_alone(loaded):
    model, enc, _, _ = loaded
    allowed = D.generable_ids(enc, model.config.vocab_size)
    replies = sample.respond(model, enc, PROMPTS, batch_size=2)  # batches of two, left-padded: same tokens
    for prompt, reply in zip(PROMPTS, replies):
        ids = enc.encode_ordinary(sftkey.prompt_head(prompt))
        expected = model.generate([ids], model.config.block_size, enc.eot_token, allowed=allowed)[0]
        assert reply.ids == expected
        assert reply.ended == (expected[-1] == enc.eot_token)
        assert reply.response == enc.decode(expected[:-1] if reply.ended else expected)
        assert reply.format_ok == sftkey.format_ok(reply.response, reply.ended)
        assert reply.answer == sftkey.extract_answer(reply.response)
    assert len({tuple(r.ids) for r in replies}) > 1  # the prompts matter: not one reply for all


def test_cli_prints_response_format_and_answer(ckpt, loaded, capsys, tmp_path):
    model, enc, _, _ = loaded
    reply = sample.respond(model, enc, ["Q: 7+5-3"])[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Q: 2+2\r\n\n  \nQ: 12+1-4+3+8\n")  # blank lines skipped, CRLF read as a line end
    sample.main(["--ckpt", ckpt, "Q: 7+5-3", "--file", str(prompts)])
    out = capsys.readouterr().out
    blocks = out.rstrip("\n").split("\n\n")
    assert len(blocks) == 3 and [b.split("\n")[0] for b in blocks] == [f"prompt:   {p}" for p in PROMPTS]
    assert blocks[0] == sample.describe(reply)
    assert f"response: {reply.response}" in blocks[0]
    assert ("<|endoftext|>\nformat:" in blocks[0]) == reply.ended
    assert f"format:   {'ok' if reply.format_ok else 'not ok'}\n" in blocks[0]
    assert blocks[0].endswith("answer:   " + ("none found" if reply.answer is None else repr(reply.answer)))


def test_greedy_replies_are_the_evaluations_in_the_runs_dtype(tmp_path, capsys, monkeypatch):
    """Found in review: sample.py decoded in float32 while evaluation ran in the run's bfloat16 (the default on a
    GPU), so its answers were not the ones results.json scored. A bf16 run evaluated one prompt at a time: the
    same prompts one at a time through sample.py give its responses exactly; --dtype float32 overrides."""
    out = tmp_path / "bf16"
    train.main(["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "48", "--n_train", "300",
                "--n_val", "10", "--n_test", "12", "--max_iters", "30", "--stage2_iters", "0", "--batch_size", "16",
                "--lr", "1e-2", "--warmup_iters", "0", "--log_interval", "1000", "--eval_interval", "1000",
                "--val_acc_n", "0", "--eval_batch_size", "1", "--device", "cpu", "--dtype", "bfloat16",
                "--out_dir", str(out)])
    scored = json.loads((out / "results.json").read_text())["results"]["sft_tag"]["responses"]
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)  # emulated bf16 would be slow: float32
    assert sample.load(str(out / "sft_tag" / "ckpt.pt"), "cpu")[3] == torch.float32
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)  # as on a CPU with AVX-512 BF16
    model, enc, tagged, dtype = sample.load(str(out / "sft_tag" / "ckpt.pt"), "cpu")
    assert dtype == torch.bfloat16 and sample.load(str(out / "sft_tag" / "ckpt.pt"), "cpu", dtype="float32")[3] \
        == torch.float32
    replies = sample.respond(model, enc, [r["prompt"] for r in scored], tagged, batch_size=1, dtype=dtype)
    assert [r.response for r in replies] == [r["response"] for r in scored]
    in_float32 = sample.respond(model, enc, [r["prompt"] for r in scored], tagged, batch_size=1)
    assert [r.response for r in in_float32] != [r["response"] for r in scored]  # the dtype is what decides


def test_describe_says_when_the_response_was_cut():
    text = sample.describe(sample.Reply("Q", [1, 2], "<Thinking>ab", False, False, None))
    assert text == ("prompt:   Q\nresponse: <Thinking>ab\n(no end-of-text: stopped after 2 tokens)\n"
                    "format:   not ok\nanswer:   none found")
    assert "format:   n/a" in sample.describe(sample.Reply("Q", [0], "x", True, None, "x"))


def test_sampling_is_reproducible_by_seed(loaded):
    model, enc, _, _ = loaded
    first = sample.respond(model, enc, PROMPTS, temperature=2.0, seed=3)
    again = sample.respond(model, enc, PROMPTS, temperature=2.0, seed=3)
    other = sample.respond(model, enc, PROMPTS, temperature=2.0, seed=4)
    assert [r.ids for r in first] == [r.ids for r in again]
    assert [r.ids for r in first] != [r.ids for r in other]
    limited = sample.respond(model, enc, PROMPTS, temperature=2.0, seed=3, max_new_tokens=3)
    assert all(len(r.ids) <= 3 for r in limited)


def test_top_k_1_is_greedy(loaded):
    model, enc, _, _ = loaded
    greedy = sample.respond(model, enc, PROMPTS)
    top1 = sample.respond(model, enc, PROMPTS, temperature=0.7, top_k=1, seed=11)
    assert [r.ids for r in top1] == [r.ids for r in greedy]


def test_sampling_never_leaves_the_allowed_ids(loaded):
    model, enc, _, _ = loaded
    # The padding rows of the table (ids the tokenizer cannot decode) are rigged to win every draw.
    rigged = GPT(model.config)
    rigged.load_state_dict(model.state_dict())
    with torch.no_grad():
        rigged.transformer.wte.weight[enc.n_vocab:] = 0
        rigged.transformer.ln_f.weight.zero_()
        rigged.transformer.ln_f.bias.fill_(1.0)  # every hidden state all ones: a padding row of ones wins
        rigged.transformer.wte.weight[enc.n_vocab:] = 5.0
    rigged.eval()
    allowed = D.generable_ids(enc, model.config.vocab_size)
    assert not allowed[enc.n_vocab:].any() and allowed[:enc.n_vocab].all()
    ids = enc.encode_ordinary(sftkey.prompt_head("Q: 1"))
    generator = torch.Generator().manual_seed(0)
    for top_k in (0, 3):
        out = sample.sample(rigged, ids, 30, -1, allowed, 5.0, top_k, generator)
        assert len(out) == 30 and all(allowed[i] for i in out)
    # Fewer ids allowed than top_k asks for: drawn among those only.
    few = torch.zeros_like(allowed)
    few[[65, 66, enc.eot_token]] = True
    out = sample.sample(model, ids, 40, -1, few, 3.0, 10, generator)
    assert set(out) <= {65, 66, enc.eot_token} and len(set(out)) > 1


def test_a_response_stops_at_the_block_limit(loaded):
    model, enc, _, _ = loaded
    prompt = "Q: " + "1+" * 20 + "1"  # 45 tokens with its newline: room for 4 more (block_size 48, + 1)
    assert len(enc.encode_ordinary(sftkey.prompt_head(prompt))) == 45
    for temperature in (0.0, 1.5):
        reply = sample.respond(model, enc, [prompt], temperature=temperature, max_new_tokens=100)[0]
        assert len(reply.ids) <= 4


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "{tmp}/absent.pt", "Q: 1"], "checkpoint {tmp}/absent.pt: no such file"),
    (["--ckpt", "{tmp}/fifo.pt", "Q: 1"], "checkpoint {tmp}/fifo.pt: not a regular file (a FIFO)"),  # never blocks
    (["--ckpt", "{tmp}/cut.pt", "Q: 1"], "cut.pt: not a readable PyTorch checkpoint"),
    (["--ckpt", "{tmp}/junk.pt", "Q: 1"], "junk.pt: "),
    (["--ckpt", "{ckpt}", "Q: 1", ""], "prompt 2 is empty"),
    (["--ckpt", "{ckpt}", "   "], "prompt 1 is empty"),
    (["--ckpt", "{ckpt}", "Q: " + "1+" * 30], "fills the model's block_size of 48"),
    (["--ckpt", "{ckpt}", "--file", "{tmp}/none.txt"], "--file {tmp}/none.txt: no such file"),
    (["--ckpt", "{ckpt}", "--file", "{tmp}/blank.txt"], "holds no prompt"),
    (["--ckpt", "{ckpt}", "Q: 1", "--file", "{tmp}/long.txt"], "{tmp}/long.txt:3 ('Q: 1+1+1"),  # its file and line
    (["--ckpt", "{ckpt}", "--file", "{tmp}/latin1.txt"], "latin1.txt:2: not valid UTF-8"),
    (["--ckpt", "{ckpt}", "Q: caf\udce9"], "prompt 1: not valid UTF-8"),  # found by attack: sampled as "Q: caf\ufffd"
    (["--ckpt", "{ckpt}"], "no prompt: give prompts as arguments, or --file"),
    (["--ckpt", "{ckpt}", "Q: 1", "--top_k", "5"], "--top_k 5 samples: give a --temperature > 0 too"),
    (["--ckpt", "{ckpt}", "Q: 1", "--temperature", "-1"], "--temperature -1.0: must be a finite number >= 0"),
    (["--ckpt", "{ckpt}", "Q: 1", "--device", "gpu7"], "--device gpu7: not a device"),
    (["--ckpt", "{ckpt}", "Q: 1", "--device", "meta"],
     "--device meta: not a device this runs on; use auto, cpu, cuda, mps"),
    (["--ckpt", "{ckpt}", "Q: 1", "--encoding", "nope"], "--encoding nope: unknown"),
] + ([(["--ckpt", "{ckpt}", "Q: 1", "--device", "mps"], "--device mps: cannot run there")]  # not "unreadable"
     if not torch.backends.mps.is_available() else []))
def test_bad_input_is_one_line_and_exit_2(ckpt, tmp_path, capsys, args, message):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    (tmp_path / "cut.pt").write_bytes(open(ckpt, "rb").read()[:1000])  # a truncated checkpoint
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes(b"Q: 1\nQ: caf\xe9\n")
    (tmp_path / "long.txt").write_text("Q: 2\n\nQ: " + "1+" * 30 + "1\n")
    os.mkfifo(tmp_path / "fifo.pt")
    args = [a.format(tmp=tmp_path, ckpt=ckpt) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        sample.main(args)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert message.format(tmp=tmp_path) in captured.err


def test_a_tiny_temperature_is_greedy_not_an_error(loaded):
    """Found in review: --temperature 1e-40 divided the logits into infinities and torch.multinomial failed with a
    traceback. The logits' distances from the best one are divided instead: the best stays at 0, and a temperature
    too small to tell the others apart leaves only it, which is greedy decoding."""
    model, enc, _, _ = loaded
    greedy = sample.respond(model, enc, PROMPTS)
    for temperature in (1e-40, 1e-300):
        assert [r.ids for r in sample.respond(model, enc, PROMPTS, temperature=temperature)] == [r.ids for r in greedy]


def test_a_huge_temperature_samples_the_allowed_ids_not_an_error(loaded):
    """Found in review: --temperature 1e39 (finite, so accepted) rounded to inf in float32, turned the disallowed ids'
    -inf logits into NaN (-inf / inf) and torch.multinomial failed with a traceback. It is capped at float32's largest
    number: nearly uniform over the allowed ids, as a huge temperature means."""
    model, enc, _, _ = loaded
    allowed = D.generable_ids(enc, model.config.vocab_size)
    for temperature, top_k in ((1e39, 0), (1e308, 10 ** 6), (3.5e38, 3)):
        replies = sample.respond(model, enc, PROMPTS, temperature=temperature, top_k=top_k, max_new_tokens=8)
        assert all(r.ids and all(allowed[i] for i in r.ids) for r in replies)


def test_a_prompt_file_with_a_byte_order_mark(ckpt, capsys, tmp_path):
    """Found in review: a --file saved with a UTF-8 byte-order mark (Windows editors) fed its first prompt with a
    U+FEFF in front, exit 0: another prompt than the one written. It is dropped, as data.py drops it from JSONL."""
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfQ: 2+2\nQ: 3+1\n")
    assert list(sample.read_prompts(str(tmp_path / "bom.txt")).values()) == ["Q: 2+2", "Q: 3+1"]
    sample.main(["--ckpt", ckpt, "--file", str(tmp_path / "bom.txt")])
    plain = capsys.readouterr().out
    sample.main(["--ckpt", ckpt, "Q: 2+2", "Q: 3+1"])
    assert plain == capsys.readouterr().out and "\ufeff" not in plain


def test_prompts_from_standard_input_with_file_dash(ckpt, capsys, monkeypatch):
    """Found by trying: a pipe was ignored, and "-" was answered as a prompt."""
    monkeypatch.setattr(sample.sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Q: 2+2\n\nQ: 3+1\n")))
    sample.main(["--ckpt", ckpt, "--file", "-"])
    piped = capsys.readouterr().out
    sample.main(["--ckpt", ckpt, "Q: 2+2", "Q: 3+1"])
    assert piped == capsys.readouterr().out and piped.count("prompt:") == 2


def test_a_tokenizer_other_than_the_one_trained_with_is_refused_unless_it_is_the_same_file_moved(tmp_path, capsys):
    """Found in review: sample.py compared only the vocabulary's size, so a model of sftkey-chars (320 rows) sampled
    with a 289-token .tiktoken file (320 rows too) printed nonsense, exit 0. The file a run was trained with passes
    from another path: its sha256 is recorded, and sample.py compares that."""
    tok, other, moved = tmp_path / "tok.tiktoken", tmp_path / "other.tiktoken", tmp_path / "moved.tiktoken"
    merges = [bytes([a, b]) for a in b"0123456789" for b in b"0123456789"][:33]
    for path, ranks in ((tok, [bytes([b]) for b in range(256)]), (other, [bytes([b]) for b in range(256)] + merges)):
        path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    tiny = ["--n_layer", "1", "--n_head", "1", "--n_embd", "8", "--block_size", "96", "--n_train", "40", "--n_val", "2",
            "--n_test", "2", "--max_iters", "1", "--stage2_iters", "0", "--batch_size", "4", "--val_acc_n", "0",
            "--device", "cpu"]
    train.main([*tiny, "--out_dir", str(tmp_path / "chars")])
    train.main([*tiny, "--encoding", str(tok), "--out_dir", str(tmp_path / "file")])
    chars, trained_on_file = (str(tmp_path / run / "sft_tag" / "ckpt.pt") for run in ("chars", "file"))
    capsys.readouterr()
    for ckpt, encoding, trained_with in ((chars, str(other), "sftkey-chars"), (chars, "gpt2", "sftkey-chars"),
                                         (trained_on_file, "sftkey-chars", str(tok))):
        with pytest.raises(SystemExit) as exit_info:
            sample.main(["--ckpt", ckpt, "--encoding", encoding, "Q: 1+1"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err == (f"error: --encoding {encoding}: {ckpt} was trained with "
                                                     f"{trained_with}, whose token ids differ; leave --encoding out "
                                                     f"to use that\n")
    moved.write_bytes(tok.read_bytes())
    sample.main(["--ckpt", trained_on_file, "--encoding", str(moved), "Q: 1+1"])
    assert capsys.readouterr().out.startswith("prompt:   Q: 1+1")


def test_a_recorded_tokenizer_file_that_is_gone_is_named_as_the_runs_not_as_a_flag_never_given(tmp_path, capsys):
    """Found in review: without --encoding, a tokenizer file the run recorded and that has since moved read
    'error: --encoding tok.tiktoken: no such file', naming a flag the user did not give."""
    tok = tmp_path / "tok.tiktoken"
    tok.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    train.main(["--encoding", str(tok), "--n_layer", "1", "--n_head", "1", "--n_embd", "8", "--block_size", "96",
                "--n_train", "40", "--n_val", "2", "--n_test", "2", "--max_iters", "1", "--stage2_iters", "0",
                "--batch_size", "4", "--val_acc_n", "0", "--device", "cpu", "--out_dir", str(tmp_path / "run")])
    ckpt, moved, _ = str(tmp_path / "run" / "sft_tag" / "ckpt.pt"), tmp_path / "moved.tiktoken", capsys.readouterr()
    tok.rename(moved)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", ckpt, "Q: 1+1"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"error: {ckpt}: the tokenizer file its run recorded, {tok}: no such file; give --encoding with the file's "
        f"path\n")
    with pytest.raises(SystemExit):  # one the user names is named by its flag, as before
        sample.main(["--ckpt", ckpt, "--encoding", str(tok), "Q: 1+1"])
    assert capsys.readouterr().err == f"error: --encoding {tok}: no such file\n"
    sample.main(["--ckpt", ckpt, "--encoding", str(moved), "Q: 1+1"])  # the same bytes: its sha256 matches
    assert capsys.readouterr().out.startswith("prompt:   Q: 1+1")


def test_a_tokenizer_file_other_than_the_one_trained_with_is_refused(tmp_path, capsys):
    """Found in review: a run trained with --encoding FILE.tiktoken, whose file then changed, was sampled with the new
    file, exit 0: other token ids, a wrong response. The checkpoint records the file's sha256; sample.py compares."""
    tok, out = tmp_path / "tok.tiktoken", tmp_path / "run"
    ranks = [bytes([b]) for b in range(256)]
    write = lambda ranks: tok.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    write(ranks)
    train.main(["--encoding", str(tok), "--n_layer", "1", "--n_head", "1", "--n_embd", "8", "--block_size", "96",
                "--n_train", "40", "--n_val", "2", "--n_test", "2", "--max_iters", "2", "--stage2_iters", "0",
                "--batch_size", "4", "--val_acc_n", "0", "--device", "cpu", "--out_dir", str(out)])
    ckpt, _ = str(out / "sft_tag" / "ckpt.pt"), capsys.readouterr()
    sample.main(["--ckpt", ckpt, "Q: 1+1"])  # the file it was trained with: accepted
    assert capsys.readouterr().out.startswith("prompt:   Q: 1+1")
    ranks[49], ranks[50] = ranks[50], ranks[49]  # "1" and "2" trade ids: the same size, another tokenizer
    write(ranks)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", ckpt, "Q: 1+1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"error: --encoding {tok}: not the tokenizer file {ckpt} was trained with" in err
    # experiment.py --save_ckpt records the hashes too; a checkpoint without them is sampled, with a note
    exp = tmp_path / "exp"
    experiment.main(["--encoding", str(tok), "--n_layer", "1", "--n_head", "1", "--n_embd", "8", "--block_size", "96",
                     "--n_train", "40", "--n_val", "2", "--n_test", "2", "--e1", "2", "--e2", "1", "--batch_size", "4",
                     "--val_acc_n", "0", "--seeds", "1", "--n_boot", "20", "--arms", "sft_tag", "--save_ckpt",
                     "--device", "cpu", "--out_dir", str(exp)])
    saved = exp / "seed1337" / "sft_tag" / "ckpt.pt"
    digest = hashlib.sha256(tok.read_bytes()).hexdigest()  # the file as the experiment read it
    assert torch.load(saved, weights_only=True)["file_hashes"] == {"--encoding": digest}
    state = torch.load(ckpt, weights_only=True)
    del state["file_hashes"]
    torch.save(state, tmp_path / "old.pt")
    capsys.readouterr()
    sample.main(["--ckpt", str(tmp_path / "old.pt"), "Q: 1+1"])
    assert capsys.readouterr().err == f"note: {tmp_path / 'old.pt'} records no sha256 of its tokenizer file; {tok} " \
                                      f"is used as it is now\n"


def test_a_tokenizer_file_given_by_another_path_is_sampled_from_a_checkpoint_without_its_sha256(tmp_path, capsys,
                                                                                                monkeypatch):
    """Found in review: a run trained with --encoding tok.tiktoken (a path relative to its folder), then sampled from
    another folder with --encoding ../a/tok.tiktoken, was refused ("whose token ids differ") when its checkpoint
    recorded no sha256 of the file (written before runs recorded them), which sample.py otherwise samples with a
    note: the same file from another path or spelling is as unverifiable as at its recorded path, not another
    tokenizer. With the sha256 recorded, it decides (as before)."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "tok.tiktoken").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n"
                                                         for b in range(256)))
    monkeypatch.chdir(tmp_path / "a")
    train.main(["--encoding", "tok.tiktoken", "--n_layer", "1", "--n_head", "1", "--n_embd", "8", "--block_size",
                "96", "--n_train", "40", "--n_val", "2", "--n_test", "2", "--max_iters", "1", "--stage2_iters", "0",
                "--batch_size", "4", "--val_acc_n", "0", "--device", "cpu", "--out_dir", "run"])
    state = torch.load(tmp_path / "a" / "run" / "sft_tag" / "ckpt.pt", weights_only=True)
    del state["file_hashes"]
    torch.save(state, tmp_path / "old.pt")
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    for ckpt, note in (("../a/run/sft_tag/ckpt.pt", ""), ("../old.pt", "note: ../old.pt records no sha256 of its "
                                                                         "tokenizer file; ../a/tok.tiktoken is used "
                                                                         "as it is now\n")):
        sample.main(["--ckpt", ckpt, "--encoding", "../a/tok.tiktoken", "Q: 1+1"])
        out, err = capsys.readouterr()
        assert out.startswith("prompt:   Q: 1+1") and err == note
