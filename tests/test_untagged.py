"""The untagged layout (--untagged, the plain-SFT baseline): trained, validated and scored as `reasoning\\n#### answer`.

The untagged arm is the paper's baseline, so a run that quietly builds part of its data in the
tagged template, or scores its answers by the tagged rule, compares the method with something else.
Every training and validation example is checked against the untagged template, and evaluation
against the untagged scoring rule: the line after the last `####`, no Fmt and no composite.
"""
import json

import pytest
import torch

import data as D
import experiment
import sftkey
import train
from conftest import run_cli
from model import GPTConfig

ENC = D.char_encoding()
FLAGS = ["--n_train", "80", "--n_val", "8", "--n_test", "4", "--block_size", "64"]


# ---------------------------------------------------------------------------------------------
# The data a run trains and validates on

@pytest.mark.parametrize("tagged", [False, True], ids=["untagged", "tagged"])
def test_load_data_builds_training_and_validation_sets_in_the_run_layout(tagged):
    cfg = train.parse_args(FLAGS + ([] if tagged else ["--untagged"]))
    train_set, val_set, test = D.load_data(cfg, ENC)
    assert len(train_set.ids) > 50 and len(val_set.ids) == 8 and len(test) == 4
    for name, data in (("training", train_set), ("validation", val_set)):
        for ex, ids, roles in zip(data.examples, data.ids, data.roles):
            text, spans = sftkey.render(ex.prompt, ex.thinking, ex.answer, tagged)
            assert ENC.decode(ids[:-1].tolist()) == text, f"a {name} example is not in the run's layout"
            assert ids[-1] == ENC.eot_token
            assert (sftkey.ANSWER_OPEN in text) == tagged and ("\n#### " in text) == (not tagged)
            n_key = len(ENC.encode_ordinary(text[spans[2][0]:])) + 1  # the key and end-of-text
            assert roles[-n_key:].tolist() == [sftkey.KEY] * n_key and roles[-n_key - 1] != sftkey.KEY, name


@pytest.mark.parametrize("answer", ["2\n3", "3 #### 1"])
@pytest.mark.parametrize("split", ["data", "eval_data"])
def test_an_answer_the_untagged_rule_could_never_score_is_refused_naming_its_line(tmp_path, answer, split):
    """Found in review: such an answer (legal in the tagged formats) could never score under --untagged, not even
    copied exactly: the rule reads one line after the last `####`. Tagged, the same files are fine."""
    good = '{"prompt": "Q: 1+1", "thinking": "1+1=2", "answer": "2"}\n'
    files = {name: tmp_path / f"{name}.jsonl" for name in ("data", "eval_data")}
    for name, path in files.items():
        bad = '{"prompt": "Q: 2+3", "thinking": "2+3=5", "answer": %s}\n' % json.dumps(answer)
        path.write_text(good * 30 + (bad if name == split else ""))
    flags = ["--data", str(files["data"]), "--eval_data", str(files["eval_data"]), "--format", "tagged", "--n_val", "2"]
    D.load_data(train.parse_args(flags), ENC)
    with pytest.raises(D.DataError, match=f"^{files[split]}:31: the untagged layout \\(--untagged; experiment.py's sft "
                                          f"arm\\) scores the one line after the last '####', and this answer has"):
        D.load_data(train.parse_args(flags + ["--untagged"]), ENC)


def test_an_experiment_with_such_an_answer_names_its_sft_arm_before_training(tmp_path, capsys):
    """experiment.py's default arms include the untagged `sft`: the refusal names it, before any arm trains."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "Q: 1+1", "thinking": "1+1=2", "answer": "2"}\n' * 40
                    + '{"prompt": "Q: 2+3", "thinking": "2+3=5", "answer": "5\\nfive"}\n')
    args = ["--data", str(data), "--eval_data", str(data), "--format", "tagged", "--n_val", "4", "--e1", "1", "--e2",
            "1", "--seeds", "1", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "2", "--out_dir",
            str(tmp_path / "exp")]
    code, out, err = run_cli(experiment.main, args, capsys)
    assert code == 2 and f"{data}:41: the untagged layout (--untagged; experiment.py's sft arm)" in err, err
    assert "seed 1337 |" not in out and " step " not in out and not (tmp_path / "exp").exists()  # nothing trained


# ---------------------------------------------------------------------------------------------
# Scoring

@pytest.mark.parametrize("response, answer", [
    ("2+3=5\n#### 5", "5"),
    ("2+3=5\n#### 5\n", "5"),
    ("#### 4\n2+3=5\n#### 5 apples\nmore text", "5 apples"),  # the last marker, its line only
    ("2+3=5\n####5", "5"),
    ("<Thinking>2+3=5</Thinking><Answer>5</Answer>", None),  # the tags mean nothing untagged
    ("<Answer>7</Answer>\n#### 5", "5"),
    ("2+3=5", None),
])
def test_extract_answer_untagged_reads_the_line_after_the_last_hash_marker(response, answer):
    assert sftkey.extract_answer(response, tagged=False) == answer


@pytest.mark.parametrize("response, answer", [
    ("2+3=5\n#### 5", None),  # and `####` means nothing tagged
    ("<Thinking>#### 4</Thinking><Answer>5</Answer>", "5"),
])
def test_extract_answer_tagged_ignores_the_hash_marker(response, answer):
    assert sftkey.extract_answer(response, tagged=True) == answer


class ScriptedModel:
    """Stands in for GPT in train.evaluate: answers each prompt with a fixed response and end-of-text."""

    def __init__(self, script: dict[str, str]):
        self.script = script
        self.config = GPTConfig(vocab_size=ENC.n_vocab)  # evaluate reads the vocabulary size

    def eval(self):
        return self

    def generate(self, prompts, *args, **kwargs):  # the limits do not matter to a script
        return [ENC.encode_ordinary(self.script[ENC.decode(ids)]) + [ENC.eot_token] for ids in prompts]


CASES = [  # (prompt, reference, response)
    ("Q: 2+3", "5", "2+3=5\n#### 5"),
    ("Q: 9-4", "5", "9-4=5\n#### 5.0"),
    ("Q: 1+1", "2", "1+1=2\n#### 3"),
    ("Q: 7+1", "8", "<Thinking>7+1=8</Thinking><Answer>8</Answer>"),  # the tagged layout: no answer untagged
]


def evaluate(untagged: bool) -> dict:
    model = ScriptedModel({p + sftkey.PROMPT_SEP: r for p, _, r in CASES})
    examples = [D.Example(p, "t", ref) for p, ref, _ in CASES]
    return train.evaluate(model, ENC, examples, train.TrainConfig(block_size=64, untagged=untagged), "cpu",
                          torch.float32)


def test_evaluate_untagged_scores_by_the_untagged_rule_and_has_no_fmt():
    result = evaluate(untagged=True)
    assert result["correct"] == [True, True, False, False]
    assert result["acc"] == pytest.approx(0.5)
    assert result["fmt"] is None and result["formatted"] is None and result["composite"] is None
    # the same responses scored tagged: only the tagged one is an answer, and Fmt is defined
    tagged = evaluate(untagged=False)
    assert tagged["correct"] == [False, False, False, True]
    assert tagged["formatted"] == [False, False, False, True] and tagged["fmt"] == pytest.approx(0.25)
