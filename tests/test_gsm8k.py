"""GSM8K and the other data formats with GPT-2's tokenizer, on the real files in ../shared/gsm8k.

Every line of the train and test files must load and tag; the split into prompt, thinking and
answer is checked against an independent parse of the raw JSON; the calculator annotations are
kept unless --strip_calculator; over-long examples are dropped and counted, never cut; the
validation split is seeded; and a miniature run goes through both stages and evaluation.
"""
import json
import os
import re

import numpy as np
import pytest

import data as D
import sftkey
import train
from conftest import GSM8K_DIR, needs_gsm8k

pytestmark = needs_gsm8k

TRAIN, TEST = os.path.join(GSM8K_DIR, "train.jsonl"), os.path.join(GSM8K_DIR, "test.jsonl")


def raw_records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tokenized(gpt2_encoding):
    """Both files read and tagged once for the module: {path: (records, examples, tokenized set)}."""
    out = {}
    for path in (TRAIN, TEST):
        examples = D.read_examples(path, "gsm8k")
        out[path] = raw_records(path), examples, D.tokenize(examples, gpt2_encoding, 1024, name=path)
    return out


@pytest.mark.parametrize("path", [TRAIN, TEST])
def test_every_line_loads_splits_as_the_raw_json_says_and_tags(tokenized, gpt2_encoding, path):
    records, examples, tset = tokenized[path]
    assert len(examples) == len(records) > 1000
    for record, ex in zip(records, examples):
        *solution, last = record["answer"].split("\n")
        assert last.startswith("#### ")
        assert (ex.prompt, ex.thinking, ex.answer) == (record["question"], "\n".join(solution).strip(), last[5:].strip())
        assert "<<" in record["answer"] or "<<" not in ex.thinking  # annotations are kept by default
    s = tset.summary
    assert s["examples"] == len(records) and s["dropped_too_long"] == 0  # GSM8K fits in GPT-2's 1024
    for ex, ids, roles in zip(tset.examples, tset.ids, tset.roles):
        text, _ = sftkey.render(ex.prompt, ex.thinking, ex.answer)
        assert gpt2_encoding.decode(ids[:-1].tolist()) == text and ids[-1] == gpt2_encoding.eot_token
        assert np.all(np.diff(roles) >= 0)  # prompt, then thinking, then key
        key_text = gpt2_encoding.decode(ids[roles == sftkey.KEY].tolist())
        assert key_text.endswith(f"<Answer>{ex.answer}</Answer><|endoftext|>")
        assert text.startswith(gpt2_encoding.decode(ids[roles == sftkey.PROMPT].tolist()))


def test_calculator_annotations_kept_by_default_and_stripped_on_request(tokenized):
    _, kept, _ = tokenized[TRAIN]
    stripped = D.read_examples(TRAIN, "gsm8k", strip_calculator=True)
    assert sum("<<" in ex.thinking for ex in kept) > len(kept) // 2
    assert not any("<<" in ex.thinking or ">>" in ex.thinking for ex in stripped)
    for a, b in zip(kept, stripped):
        assert (a.prompt, a.answer) == (b.prompt, b.answer)
        assert b.thinking == re.sub(r"<<[^<>]*>>", "", a.thinking).strip()
    # the first problem, annotation by annotation
    assert kept[0].thinking.startswith("Natalia sold 48/2 = <<48/2=24>>24 clips in May.")
    assert stripped[0].thinking.startswith("Natalia sold 48/2 = 24 clips in May.")


def test_the_three_formats_give_the_same_example(tmp_path):
    record = raw_records(TRAIN)[0]
    ex = D.read_examples(TRAIN, "gsm8k")[0]
    rows = {"tagged": {"prompt": ex.prompt, "thinking": ex.thinking, "answer": ex.answer},
            "completion": {"prompt": ex.prompt,
                           "completion": f"<Thinking>{ex.thinking}</Thinking><Answer>{ex.answer}</Answer>"}}
    for fmt, row in rows.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        assert D.read_examples(str(path), fmt) == [ex], fmt
    assert ex.answer == record["answer"].rsplit("#### ", 1)[1]


def test_over_long_examples_are_dropped_and_counted_never_cut(tokenized, gpt2_encoding):
    _, examples, full = tokenized[TEST]
    lengths = np.array([len(ids) - 1 for ids in full.ids])  # what the model reads of each example
    block = int(np.median(lengths))
    short = D.tokenize(examples, gpt2_encoding, block, name="test")
    assert short.summary["dropped_too_long"] == int((lengths > block).sum()) > 0
    assert short.summary["examples"] + short.summary["dropped_too_long"] == len(examples)
    assert all(len(ids) - 1 <= block and ids[-1] == gpt2_encoding.eot_token for ids in short.ids)


def test_validation_split_is_seeded_and_disjoint(tokenized):
    _, examples, _ = tokenized[TRAIN]
    train_a, val_a = D.split(examples, 500, seed=3)
    train_b, val_b = D.split(examples, 500, seed=3)
    _, val_c = D.split(examples, 500, seed=4)
    assert len(val_a) == 500 and len(train_a) == len(examples) - 500
    assert val_a == val_b and train_a == train_b and val_a != val_c
    seen = {id(ex) for ex in train_a} | {id(ex) for ex in val_a}
    assert len(seen) == len(examples)  # every example in exactly one part


def test_miniature_gsm8k_run_through_both_stages_and_evaluation(tmp_path, capsys):
    with open(TRAIN, encoding="utf-8") as f:
        (tmp_path / "train.jsonl").write_text("".join(f.readlines()[:64]))
    with open(TEST, encoding="utf-8") as f:
        (tmp_path / "test.jsonl").write_text("".join(f.readlines()[:8]))
    out = tmp_path / "out"
    train.main(["--data", str(tmp_path / "train.jsonl"), "--eval_data", str(tmp_path / "test.jsonl"),
                "--format", "gsm8k", "--encoding", "gpt2", "--strip_calculator", "--block_size", "192",
                "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8", "--n_val", "6",
                "--max_iters", "3", "--stage2_iters", "2", "--log_interval", "1", "--eval_interval", "100",
                "--device", "cpu", "--dtype", "float32", "--out_dir", str(out)])
    printed = capsys.readouterr().out
    assert "prompt-prefix mismatches" in printed and "sftkey_tag step" in printed
    summary = json.loads((out / "results.json").read_text())
    train_summary, val_summary = summary["data"]
    assert val_summary["examples"] + val_summary["dropped_too_long"] == 6
    assert train_summary["examples"] + train_summary["dropped_too_long"] == 58
    assert summary["config"]["strip_calculator"] is True
    for stage in ("sft_tag", "sftkey_tag"):
        r = summary["results"][stage]
        assert r["n"] == 8 and len(r["correct"]) == 8 and 0 <= r["acc"] <= 1 and 0 <= r["fmt"] <= 1
        assert (out / stage / "ckpt.pt").is_file()


def test_test_prompt_longer_than_the_block_is_refused_before_training(tmp_path, gpt2_encoding):
    rows = [{"prompt": f"{a} plus {a}?", "thinking": f"{a}+{a}={2 * a}", "answer": str(2 * a)} for a in range(20)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    long_prompt = {"prompt": "word " * 40, "thinking": "t", "answer": "1"}
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(long_prompt) + "\n")
    cfg = train.TrainConfig(data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "test.jsonl"),
                            format="tagged", encoding="gpt2", block_size=32, n_val=2)
    with pytest.raises(D.DataError, match=r"test.jsonl:2: the prompt alone fills --block_size 32"):
        D.load_data(cfg, gpt2_encoding)
    cfg.eval_limit = 1  # only the first test example is used: nothing to refuse
    assert len(D.load_data(cfg, gpt2_encoding)[2]) == 1
