"""The data: tokenizers, datasets on disk, the embedded synthetic task, and batching.

Every example is a (prompt, thinking, answer) triple. `sftkey.render` writes it as text and
`sftkey.tag` turns it into token ids and roles; this file reads examples, tokenizes a whole set
once (with a summary of what it holds) and cuts it into padded batches.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch

import sftkey

SYNTHETIC_ENCODING = "sftkey-chars"
FORMATS = ("gsm8k", "tagged", "completion")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


class DataError(ValueError):
    """Bad input: the message names the file, the line and the problem."""


# ---------------------------------------------------------------------------------------------
# Tokenizers

def char_encoding() -> tiktoken.Encoding:
    """A compact, offline tokenizer for the synthetic task: one token per byte, one per tag.

    Digits stay single tokens (so arithmetic is not obscured by BPE merges) and the four tags are
    single tokens (built as merge chains over their prefixes), which keeps sequences short.
    It needs no download, so the default run works on a machine with no network.
    """
    ranks = {bytes([b]): b for b in range(256)}
    for tag in sftkey.TAGS:
        for end in range(2, len(tag) + 1):
            ranks.setdefault(tag[:end].encode(), len(ranks))
    pattern = "|".join(re.escape(t) for t in sftkey.TAGS) + r"|[\s\S]"
    return tiktoken.Encoding(SYNTHETIC_ENCODING, pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def get_encoding(name: str) -> tiktoken.Encoding:
    """`sftkey-chars`, a tiktoken encoding name (`gpt2`, `cl100k_base`), or a `.tiktoken` file."""
    if name == SYNTHETIC_ENCODING:
        return char_encoding()
    if name.endswith(".tiktoken") or os.path.sep in name:
        if not os.path.isfile(name):
            raise FileNotFoundError(f"--encoding {name}: no such file")
        from tiktoken.load import load_tiktoken_bpe
        ranks = load_tiktoken_bpe(name)
        # A .tiktoken file holds only the merges: split text as cl100k_base does, end-of-text last.
        return tiktoken.Encoding(os.path.basename(name), pat_str=_CL100K_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": len(ranks)})
    if name not in tiktoken.list_encoding_names():
        raise ValueError(f"--encoding {name}: unknown; use {SYNTHETIC_ENCODING}, a .tiktoken file, or one of "
                         f"{', '.join(tiktoken.list_encoding_names())}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as err:  # tiktoken downloads its BPE files on first use
        raise ValueError(f"--encoding {name}: could not load its BPE files ({type(err).__name__}). With no "
                           f"network, point TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached files.") from err


_CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                   r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


# ---------------------------------------------------------------------------------------------
# Examples

@dataclass(frozen=True)
class Example:
    prompt: str
    thinking: str
    answer: str


def synthetic_task(n: int, seed: int) -> list[Example]:
    """Multi-step arithmetic with a worked solution, generated deterministically from `seed`.

    "Q: 47+38-19+6" is solved as "47+38=85 85-19=66 66+6=72" with answer "72". Each problem has
    two to five numbers, all of one or all of two digits, so difficulty ranges from trivial to
    hard and a small model's accuracy moves gradually rather than all at once. Problems are
    distinct within a call.
    """
    rng = np.random.default_rng(seed)
    seen, examples = set(), []
    while len(examples) < n:
        high = 10 if rng.random() < 0.5 else 100
        numbers = rng.integers(1, high, size=int(rng.integers(2, 6))).tolist()
        ops = rng.choice(["+", "-"], size=len(numbers) - 1).tolist()
        prompt = "Q: " + str(numbers[0]) + "".join(op + str(x) for op, x in zip(ops, numbers[1:]))
        if prompt in seen:
            continue
        seen.add(prompt)
        total, steps = numbers[0], []
        for op, x in zip(ops, numbers[1:]):
            new = total + x if op == "+" else total - x
            steps.append(f"{total}{op}{x}={new}")
            total = new
        examples.append(Example(prompt, " ".join(steps), str(total)))
    return examples


def read_examples(path: str, fmt: str, strip_calculator: bool = False) -> list[Example]:
    """Read a JSONL file in one of FORMATS; any bad line raises DataError naming file and line.

    gsm8k: {"question", "answer"}, the answer ending in a line "#### final".
    tagged: {"prompt", "thinking", "answer"}.
    completion: {"prompt", "completion"}, the completion being <Thinking>…</Thinking><Answer>…</Answer>.
    """
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        line = 1 + open(path, "rb").read()[:err.start].count(b"\n")
        raise DataError(f"{path}:{line}: not valid UTF-8") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            examples.append(_parse(line, fmt, strip_calculator))
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}:{number}: {err}") from None
    if not examples:
        raise DataError(f"{path}: no examples in the file")
    return examples


def _parse(line: str, fmt: str, strip_calculator: bool) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    fields = {"gsm8k": ("question", "answer"), "tagged": ("prompt", "thinking", "answer"),
              "completion": ("prompt", "completion")}[fmt]
    for name in fields:
        if name not in record:
            raise ValueError(f"missing field '{name}' (the {fmt} format has {', '.join(fields)})")
        if not isinstance(record[name], str):
            raise ValueError(f"field '{name}' must be a string, got {type(record[name]).__name__}")
    if fmt == "gsm8k":
        thinking, sep, answer = record["answer"].rpartition("\n####")
        if not sep:
            raise ValueError("the gsm8k answer has no final line '#### <answer>'")
        prompt = record["question"]
        if strip_calculator:
            thinking = _CALCULATOR.sub("", thinking)
    elif fmt == "tagged":
        prompt, thinking, answer = record["prompt"], record["thinking"], record["answer"]
    else:
        prompt, (thinking, answer) = record["prompt"], _split_completion(record["completion"])
    example = Example(prompt, thinking.strip(), answer.strip())
    _check_example(example)
    return example


def _split_completion(completion: str) -> tuple[str, str]:
    for tag in sftkey.TAGS:
        count = completion.count(tag)
        if count != 1:
            raise ValueError(f"the completion must hold {tag} exactly once, found it {count} times")
    match = re.fullmatch(r"\s*<Thinking>(.*)</Thinking>\s*<Answer>(.*)</Answer>\s*", completion, re.S)
    if not match:
        raise ValueError("the completion is not <Thinking>…</Thinking><Answer>…</Answer>")
    return match.group(1), match.group(2)


def _check_example(example: Example) -> None:
    if not example.answer:
        raise ValueError("empty answer")
    for name, value in vars(example).items():
        if "<|endoftext|>" in value:
            raise ValueError(f"the {name} contains '<|endoftext|>', which would end the example early")
        if name != "prompt" and any(t in value for t in sftkey.TAGS):
            raise ValueError(f"the {name} contains one of the tags {', '.join(sftkey.TAGS)}")


def split(examples: list[Example], n_val: int, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded (train, validation) split, validation of `n_val` examples."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = min(n_val, len(examples) // 10)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


# ---------------------------------------------------------------------------------------------
# Tokenized sets and batches

@dataclass
class TokenizedSet:
    """Token ids and roles of every kept example (each `ids` ends with end-of-text)."""
    examples: list[Example]
    ids: list[np.ndarray]
    roles: list[np.ndarray]
    summary: dict


def tokenize(examples: list[Example], enc: tiktoken.Encoding, block_size: int, tagged: bool = True,
             name: str = "data") -> TokenizedSet:
    """Tag every example; drop (and count) the ones that do not fit in `block_size`."""
    kept, ids_list, roles_list = [], [], []
    straddling = prefix_mismatch = dropped = 0
    for example in examples:
        text, spans = sftkey.render(example.prompt, example.thinking, example.answer, tagged)
        ids, roles = sftkey.tag(enc, text, spans)
        if len(ids) - 1 > block_size:  # the model reads all but the last token
            dropped += 1
            continue
        straddling += sftkey.count_straddling(enc, text, spans, ids)
        prompt_ids = enc.encode_ordinary(text[:spans[0][1]])
        prefix_mismatch += ids[:len(prompt_ids)] != prompt_ids
        kept.append(example)
        ids_list.append(np.array(ids, dtype=np.int64))
        roles_list.append(np.array(roles, dtype=np.int64))
    if not kept:
        raise DataError(f"{name}: all {len(examples)} examples are longer than block_size {block_size}")
    counts = np.array([np.bincount(r, minlength=3)[:3] for r in roles_list])
    summary = {"name": name, "examples": len(kept), "dropped_too_long": dropped,
               **{f"{role}_tokens_mean": float(counts[:, i].mean()) for i, role in enumerate(sftkey.ROLE_NAMES)},
               **{f"{role}_tokens_max": int(counts[:, i].max()) for i, role in enumerate(sftkey.ROLE_NAMES)},
               "key_fraction": float(counts[:, 2].sum() / counts[:, 1:].sum()),
               "straddling_tokens": straddling, "prompt_prefix_mismatches": prefix_mismatch}
    return TokenizedSet(kept, ids_list, roles_list, summary)


def format_summary(summary: dict) -> str:
    s = summary
    return (f"{s['name']}: {s['examples']} examples ({s['dropped_too_long']} dropped as too long); tokens per "
            f"example: prompt {s['prompt_tokens_mean']:.1f} (max {s['prompt_tokens_max']}), thinking "
            f"{s['thinking_tokens_mean']:.1f} (max {s['thinking_tokens_max']}), key {s['key_tokens_mean']:.1f} "
            f"(max {s['key_tokens_max']}); key fraction of response {s['key_fraction']:.1%}; straddling tokens "
            f"{s['straddling_tokens']}; prompt-prefix mismatches {s['prompt_prefix_mismatches']}")


def collate(ids: list[np.ndarray], roles: list[np.ndarray], device: str) -> tuple[torch.Tensor, ...]:
    """Right-padded (inputs, targets, target roles): position t predicts token t+1 from tokens <= t.

    The role of a prediction is the role of the token being predicted, so the first `<Thinking>`
    token is learnt from the prompt's last position and end-of-text from `</Answer>`'s.
    """
    width = max(len(x) for x in ids) - 1
    x = np.zeros((len(ids), width), dtype=np.int64)
    y = np.zeros((len(ids), width), dtype=np.int64)
    r = np.full((len(ids), width), sftkey.PAD, dtype=np.int64)
    for row, (seq, role) in enumerate(zip(ids, roles)):
        n = len(seq) - 1
        x[row, :n], y[row, :n], r[row, :n] = seq[:-1], seq[1:], role[1:]
    tensors = (torch.from_numpy(a) for a in (x, y, r))
    if device.startswith("cuda"):
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


class Batches:
    """Micro-batch number i of an endless, seeded stream over the set, computed from i alone.

    Each epoch is a fresh permutation; within windows of 64 batches the examples are sorted by
    length so that a batch holds sequences of similar length (little padding), and the batches'
    order is shuffled again. Being a pure function of (seed, i) makes a resumed run see exactly
    the batches an uninterrupted one would.
    """

    def __init__(self, data: TokenizedSet, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, min(batch_size, len(data.ids)), seed
        self.per_epoch = len(data.ids) // self.batch_size
        self._epoch, self._plan = -1, []

    def _plan_epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.data.ids))[:self.per_epoch * self.batch_size]
        lengths = np.array([len(self.data.ids[i]) for i in order])
        window = 64 * self.batch_size
        for start in range(0, len(order), window):
            chunk = slice(start, start + window)
            order[chunk] = order[chunk][np.argsort(lengths[chunk], kind="stable")]
        batches = order.reshape(self.per_epoch, self.batch_size)
        return list(batches[rng.permutation(self.per_epoch)])

    def indices(self, i: int) -> np.ndarray:
        epoch = i // self.per_epoch
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self._plan_epoch(epoch)
        return self._plan[i % self.per_epoch]

    def get(self, i: int, device: str) -> tuple[torch.Tensor, ...]:
        rows = self.indices(i)
        return collate([self.data.ids[j] for j in rows], [self.data.roles[j] for j in rows], device)
