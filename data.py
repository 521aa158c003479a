"""The data: tokenizers, datasets on disk, the embedded synthetic task, and batching.

Every example is a (prompt, thinking, answer) triple, which `sftkey.render` writes as text and `sftkey.tag`
turns into token ids and roles; here a whole set is tokenized once (with a summary) and cut into padded batches.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import tiktoken
import torch

import sftkey

SYNTHETIC_ENCODING = "sftkey-chars"
FORMATS = ("gsm8k", "tagged", "completion", "messages")
TASKS = ("arithmetic", "parity")  # the embedded synthetic tasks: the answer is the result, or whether it is even
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                   r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_KINDS = {"p": "a FIFO", "c": "a character device", "b": "a block device", "d": "a folder", "s": "a socket"}


class DataError(ValueError):
    """Bad input: the message names the file, the line and the problem."""


def read_input(path: str, flag: str) -> bytes:
    """All the bytes of the regular file `path` (`flag` names it in errors), through one descriptor: opened
    with O_NONBLOCK (a FIFO must not wait for a writer), checked by its own fstat (the path's could change)."""
    fd = None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        if (kind := stat.filemode(os.fstat(fd).st_mode)[0]) == "-":
            return b"".join(iter(lambda: os.read(fd, 1 << 24), b""))
        problem = f"not a regular file ({_KINDS.get(kind, 'of no known kind')}); give a file"  # /dev/zero never ends
    except OSError as err:  # no permission, ...; a socket cannot even be opened
        problem = ("no such file" if isinstance(err, FileNotFoundError) else f"cannot read it ({err.strerror or err})"
                   if not Path(path).is_socket() else "not a regular file (a socket); give a file")
    finally:
        if fd is not None:
            os.close(fd)
    raise DataError(f"{flag} {path}: {problem}")


# --- Tokenizers -----------------------------------------------------------------------------------

def char_encoding() -> tiktoken.Encoding:
    """A compact, offline tokenizer for the synthetic task: one token per byte, one per tag (a merge chain
    over its prefixes). Single-digit tokens keep arithmetic clear of BPE merges; no download is needed."""
    ranks = {bytes([b]): b for b in range(256)}
    for tag in sftkey.TAGS:
        for end in range(2, len(tag) + 1):
            ranks.setdefault(tag[:end].encode(), len(ranks))
    pattern = "|".join(re.escape(t) for t in sftkey.TAGS) + r"|[\s\S]"
    return tiktoken.Encoding(SYNTHETIC_ENCODING, pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def is_tokenizer_file(name: str) -> bool:
    """Whether an --encoding names a .tiktoken file (read and hashed as an input) rather than an encoding."""
    return name.endswith(".tiktoken") or os.path.sep in name


def get_encoding(name: str, raw: bytes | None = None) -> tiktoken.Encoding:
    """`sftkey-chars`, a tiktoken encoding name (`gpt2`, `cl100k_base`), or a `.tiktoken` file (`raw`: its bytes)."""
    if name == SYNTHETIC_ENCODING:
        return char_encoding()
    if is_tokenizer_file(name):
        ranks = read_tiktoken_file(name, raw)
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


def read_tiktoken_file(path: str, raw: bytes | None = None) -> dict[bytes, int]:
    """The merges of a `.tiktoken` file ("base64-token rank" lines; `raw`: its bytes), read here, not by tiktoken.load,
    which caches a file under its path's name (an edited file's old contents). Every byte needs a rank (or some
    text cannot be encoded); ranks are 0 to n-1 (a gap leaves ids with no bytes, a huge rank a huge embedding)."""
    raw = read_input(path, "--encoding") if raw is None else raw
    lines = [(number, line) for number, line in enumerate(raw.split(b"\n"), 1) if line.strip()]
    ranks, rank_line = {}, {}  # rank_line: where each rank first appeared
    for number, line in lines:
        try:
            token, rank = line.split()
            token, rank = base64.b64decode(token, validate=True), int(rank)
        except (ValueError, binascii.Error):
            raise DataError(f"{path}:{number}: not a '<base64 token> <rank>' line") from None
        problem = (f"rank {rank} is not below {len(lines)}, the number of tokens" if not 0 <= rank < len(lines)
                   else f"rank {rank} repeats line {rank_line[rank]}" if rank in rank_line
                   else f"the token {token!r} repeats line {rank_line[ranks[token]]}" if token in ranks else "")
        if problem:
            raise DataError(f"{path}:{number}: {problem}; the ranks must be 0 to n-1, each once, one per token")
        ranks[token], rank_line[rank] = rank, number
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(f"{path}: {len(missing)} of the 256 single bytes have no rank (the first: 0x{missing[0]:02x}), "
                        f"so some text could not be encoded; this is not a complete BPE file")
    return ranks


def generable_ids(enc: tiktoken.Encoding, vocab_size: int) -> torch.Tensor:
    """Which of the model's `vocab_size` ids generation may produce: the ones `enc` can decode (every
    token has bytes). Gaps in its ids (cl100k_base has 16) and padding rows above n_vocab have none."""
    return torch.from_numpy(np.pad(sftkey.token_byte_lengths(enc), (0, vocab_size))[:vocab_size] > 0)


# --- Examples -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    prompt: str
    thinking: str
    answer: str
    source: str = field(default="", compare=False)  # "file:line" it was read from, for error messages


def synthetic_task(n: int, seed: int | list, exclude: frozenset = frozenset(), distinct: bool = True) -> list[Example]:
    """Multi-step arithmetic with a worked solution, seeded: "Q: 17+8-5+9" is solved as "17+8=25 25-5=20 20+9=29",
    answer "29": a start below 20, then one to five (uniformly) additions or subtractions of a digit, never below
    zero (why: docs/data_formats.md). A problem in `exclude` or (with `distinct`) a repeat is redrawn with as many
    steps, so step counts keep their law exactly (the 306 one-step problems can run out)."""
    rng = np.random.default_rng(seed)
    seen, examples = set(exclude), []
    while len(examples) < n:
        example, tries = _problem(rng), 0
        while example.prompt in seen:
            if (tries := tries + 1) > 10_000:
                raise DataError(f"no {example.thinking.count('=')}-step synthetic problem left to draw: lower --n_test")
            example = _problem(rng, example.thinking.count("="))
        seen.update([example.prompt] if distinct else [])
        examples.append(example)
    return examples


def _problem(rng: np.random.Generator, n_steps: int = 0) -> Example:
    total = int(rng.integers(1, 20))
    prompt, steps = f"Q: {total}", []
    for _ in range(n_steps or int(rng.integers(1, 6))):
        x = int(rng.integers(1, 10))
        op = "-" if x <= total and rng.random() < 0.5 else "+"
        prompt += f"{op}{x}"
        steps.append(f"{total}{op}{x}={(total := total - x if op == '-' else total + x)}")
    return Example(prompt, " ".join(steps), str(total))


def read_examples(path: str, fmt: str, strip_calculator: bool = False, skip_bad_lines: bool = False,
                  skipped: list[str] | None = None, raw: bytes | None = None) -> list[Example]:
    """Read a JSONL file in one of FORMATS (or its bytes, `raw`; the formats: docs/data_formats.md); any bad line
    raises DataError naming file and line, or with `skip_bad_lines` is skipped, its "file:line: problem" appended
    to `skipped`. Lines are split on "\\n" only (JSON strings may hold U+2028, a line end to str.splitlines); a
    trailing "\\r" and a byte-order mark are dropped; each line is decoded alone, so bad UTF-8 is reported by line."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")
    raw = (read_input(path, "data file") if raw is None else raw).removeprefix(b"\xef\xbb\xbf")  # a byte-order mark
    examples, bad = [], []
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.removesuffix(b"\r").decode("utf-8")
            if text.strip(" \t\r\n"):  # JSON's whitespace: a line of U+00A0 is a bad line, not a blank one
                examples.append(_parse(text, fmt, strip_calculator, f"{path}:{number}"))
        except UnicodeDecodeError as err:
            bad.append(f"{path}:{number}: not valid UTF-8 (byte 0x{line[err.start]:02x} at byte {err.start + 1} "
                       f"of the line)")
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            bad.append(f"{path}:{number}: {err}")
        if bad and not skip_bad_lines:
            raise DataError(f"{bad[0]}. Fix the line, or pass --skip_bad_lines to skip and count bad lines.")
    if skipped is not None:
        skipped.extend(bad)
    if not examples:
        why = f" ({len(bad)} bad lines skipped, the first: {bad[0]})" if bad else ""
        raise DataError(f"{path}: no examples in the file{why}")
    return examples


def _parse(line: str, fmt: str, strip_calculator: bool, source: str = "") -> Example:
    try:
        record = json.loads(line, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and re.search(r"\r\s*\Z", line[:err.pos]):  # `{..}\r{..}`: a CR between records
            raise ValueError("two records on one line, split by a CR alone: the file uses CR-only line ends; "
                             "convert them to \\n (e.g. tr '\\r' '\\n')") from None
        what = err.msg.removesuffix(" at") + ("" if (c := line[err.pos:][:1]).isprintable() else f" U+{ord(c):04X}")
        raise ValueError(f"invalid JSON ({what} at column {err.colno})") from None
    except RecursionError:
        raise ValueError("invalid JSON (nested too deeply)") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "messages" or (fmt == "completion" and isinstance(record.get("prompt"), list)):  # chat turns
        if fmt == "completion" and not (isinstance(record.get("completion"), list) and len(record["completion"]) == 1):
            raise ValueError('a chat "prompt" needs a "completion" of one message: the assistant\'s tagged response')
        turns = record.get("messages") if fmt == "messages" else [*record["prompt"], *record["completion"]]
        record, fmt = _turns(turns), "completion"
    fields = {"gsm8k": ("question", "answer"), "tagged": ("prompt", "thinking", "answer"),
              "completion": ("prompt", "completion")}[fmt]
    for name in fields:
        if name not in record:
            raise ValueError(f"missing field '{name}' (the {fmt} format has {', '.join(fields)})")
        if not isinstance(record[name], str):
            raise ValueError(f"field '{name}' must be a string, got {type(record[name]).__name__}")
    if fmt == "gsm8k":
        prompt, (thinking, sep, answer) = record["question"], ("\n" + record["answer"]).rpartition("\n####")
        if not sep or not thinking.strip() or "\n" in answer.strip():  # reasoning, then a last line "#### 5"
            why = "text after its" if sep and thinking.strip() else "no reasoning before its" if sep else "no"
            raise ValueError(f"the gsm8k answer has {why} final line '#### <answer>'")
    elif fmt == "tagged":
        prompt, thinking, answer = record["prompt"], record["thinking"], record["answer"]
    else:
        prompt, completion = record["prompt"], record["completion"]
        for tag in sftkey.TAGS:
            if (count := completion.count(tag)) != 1:
                raise ValueError(f"the completion must hold {tag} exactly once, found it {count} times")
        if not (match := re.fullmatch(r"\s*<Thinking>(.*)</Thinking>\s*<Answer>(.*)</Answer>\s*", completion, re.S)):
            raise ValueError("the completion is not <Thinking>…</Thinking><Answer>…</Answer>")
        thinking, answer = match.groups()
    thinking = _CALCULATOR.sub("", thinking) if strip_calculator else thinking  # every format's reasoning
    example = Example(prompt, thinking.strip(), answer.strip(), source)
    _check_example(example)
    return example


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object; a key given twice is an error (json.loads would keep the last one, silently)."""
    if twice := [key for key, n in Counter(key for key, _ in pairs).items() if n > 1]:
        raise ValueError(f"the key {twice[0]!r} appears twice in one object")
    return dict(pairs)


def _turns(messages) -> dict:
    """One user and one assistant turn as {"prompt", "completion"}; a system message, unless blank, leads the prompt."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in messages):
        raise ValueError('the messages ("messages", or a chat "prompt" and "completion") must be a list of '
                         '{"role": ..., "content": "<a string>"}')
    roles = [m.get("role") for m in messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise ValueError(f"the messages must be one user turn then one assistant turn (a system message may lead); "
                         f"got the roles {roles}")
    prompt = "\n\n".join(m["content"] for m in messages[:-1] if m["role"] == "user" or m["content"].strip())
    return {"prompt": prompt, "completion": messages[-1]["content"]}


def _check_example(example: Example) -> None:
    for name in ("prompt", "thinking", "answer"):
        value = getattr(example, name)
        if "<|endoftext|>" in value:
            raise ValueError(f"the {name} contains '<|endoftext|>', which would end the example early")
        if name != "prompt" and (found := [t for t in sftkey.TAGS if t in value]):  # an ambiguous response
            raise ValueError(f"the {name} contains the tag {found[0]}, which only the template may write")
        if surrogate := re.search("[\ud800-\udfff]", value):  # a lone surrogate such as \ud800, legal in JSON
            raise ValueError(f"the {name} holds {surrogate.group()!r}, which is not a Unicode character")
    if empty := next((n for n in ("prompt", "answer") if sftkey.invisible(getattr(example, n))), None):  # nothing asked
        raise ValueError(f"empty {empty}" + (" (only invisible characters)" if getattr(example, empty) else ""))


def split(examples: list[Example], n_val: int, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded (train, validation) split, validation of `n_val` examples, at most a tenth of them."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = min(n_val, len(examples) // 10)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


# --- Tokenized sets and batches -------------------------------------------------------------------

@dataclass
class TokenizedSet:
    """Token ids and roles of every kept example (each `ids` ends with end-of-text)."""
    examples: list[Example]
    ids: list[np.ndarray]
    roles: list[np.ndarray]
    summary: dict
    enc: tiktoken.Encoding | None = None  # what they were tokenized with (for generating from their prompts)


def tokenize(examples: list[Example], enc: tiktoken.Encoding, block_size: int, tagged: bool = True,
             name: str = "data") -> TokenizedSet:
    """Tag every example; drop (and count) the ones that do not fit in `block_size`."""
    if not examples:
        raise DataError(f"{name}: no examples")
    kept, ids_list, roles_list, unread, mismatched = [], [], [], [], []  # mismatched: whose prompt alone differs
    straddling, dropped, shortest, max_bytes = 0, 0, None, max(map(len, enc.token_byte_values()))  # of one token
    for example in examples:
        text, spans = sftkey.render(example.prompt, example.thinking, example.answer, tagged)
        if len(text.encode("utf-8")) > block_size * max_bytes:  # cannot fit: not tagged (5 MB took 9.6 s)
            unread.append(text)
            continue
        try:
            ids, roles = sftkey.tag(enc, text, spans)
        except ValueError as err:  # e.g. an empty reasoning that one token of this encoding swallows
            hint = "; its reasoning is empty: give it one or drop the line" if not example.thinking else ""
            raise DataError(f"{example.source or name}: with encoding {enc.name}, {err}{hint}") from None
        if len(ids) - 1 > block_size:  # the model reads all but the last token
            dropped, shortest = dropped + 1, min(shortest or len(ids) - 1, len(ids) - 1)
            continue
        straddling += sftkey.count_straddling(enc, text, spans, ids)
        if prompt_tokens_differ(enc, text, spans, ids):
            mismatched.append(example.source or name)
        kept.append(example)
        ids_list.append(np.array(ids, dtype=np.int64))
        roles_list.append(np.array(roles, dtype=np.int64))
    if not kept:  # unread texts are tokenized only where one could be shorter than the shortest read
        lengths = [len(enc.encode_ordinary(t)) for t in unread if len(t.encode()) < max_bytes * (shortest or 1e30)]
        raise DataError(f"{name}: all {len(examples)} examples are longer than --block_size {block_size} tokens "
                        f"(the shortest has {min(lengths + [shortest or 1e30])}); raise --block_size or shorten them")
    counts = np.array([np.bincount(r, minlength=3)[:3] for r in roles_list])
    summary = {"name": name, "examples": len(kept), "dropped_too_long": dropped + len(unread),
               **{f"{role}_tokens_mean": float(counts[:, i].mean()) for i, role in enumerate(sftkey.ROLE_NAMES)},
               **{f"{role}_tokens_max": int(counts[:, i].max()) for i, role in enumerate(sftkey.ROLE_NAMES)},
               "key_fraction": float(counts[:, 2].sum() / counts[:, 1:].sum()),
               "straddling_tokens": straddling, "prompt_prefix_mismatches": len(mismatched),
               # the first in the file: "f:9" before "f:10" (one file, so the shorter is the earlier line)
               "first_prompt_prefix_mismatch": min(mismatched, key=lambda s: (len(s), s), default=None)}
    return TokenizedSet(kept, ids_list, roles_list, summary, enc)


def prompt_tokens_differ(enc: tiktoken.Encoding, text: str, spans: list[tuple[int, int, int]],
                         ids: list[int] | None = None) -> bool:
    """Whether the prompt alone (`sftkey.prompt_head`, what evaluation feeds) tokenizes otherwise than the
    start of the rendered `text` (tokens `ids`): evaluation would feed a sequence training never had."""
    ids = enc.encode_ordinary(text) if ids is None else ids
    prompt_ids = enc.encode_ordinary(text[:spans[0][1]])
    return ids[:len(prompt_ids)] != prompt_ids


def collate(ids: list[np.ndarray], roles: list[np.ndarray], device: str) -> tuple[torch.Tensor, ...]:
    """Right-padded (inputs, targets, target roles): position t predicts token t+1 from tokens <= t. A prediction
    has the predicted token's role, so `<Thinking>` is learnt from the prompt's last position, end-of-text from
    `</Answer>`'s."""
    width = max(len(x) for x in ids) - 1
    x, y = np.zeros((2, len(ids), width), dtype=np.int64)
    r = np.full((len(ids), width), sftkey.PAD, dtype=np.int64)
    for row, (seq, role) in enumerate(zip(ids, roles)):
        n = len(seq) - 1
        x[row, :n], y[row, :n], r[row, :n] = seq[:-1], seq[1:], role[1:]
    pin = device.startswith("cuda")  # from pinned memory the copy runs while the host goes on
    return tuple((t.pin_memory() if pin else t).to(device, non_blocking=pin) for t in map(torch.from_numpy, (x, y, r)))


class Batches:
    """Batch number i of an endless, seeded stream over the set, computed from i alone (so a resumed run sees
    the batches an uninterrupted one would); `get` cuts it into micro-batches. Each epoch is a fresh permutation,
    sorted by length within windows of `window` batches (similar lengths pad less), the batches then shuffled.
    Padding falls roughly as 1/window while a smaller window draws batch-mates from a smaller pool: on GSM8K train
    (gpt2, batch 32) padding is 47% of computed positions ungrouped, 7% at window 16, 2% at 64 (bench.py)."""

    def __init__(self, data: TokenizedSet, batch_size: int, seed: int, window: int = 16):
        if window < 1:
            raise ValueError(f"Batches: window must be at least 1 batch, got {window}")
        if len(data.ids) < batch_size:
            raise DataError(f"{data.summary.get('name', 'data')}: {len(data.ids)} examples for batches of {batch_size}")
        self.data, self.batch_size, self.seed, self.window = data, batch_size, seed, window
        self.per_epoch = len(data.ids) // self.batch_size
        self._epoch, self._plan = -1, []

    def _plan_epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.data.ids))[:self.per_epoch * self.batch_size]
        lengths = np.array([len(self.data.ids[i]) for i in order])
        window = self.window * self.batch_size
        for chunk in (slice(start, start + window) for start in range(0, len(order), window)):
            order[chunk] = order[chunk][np.argsort(lengths[chunk], kind="stable")]
        batches = order.reshape(self.per_epoch, self.batch_size)
        return list(batches[rng.permutation(self.per_epoch)])

    def indices(self, i: int) -> np.ndarray:
        epoch = i // self.per_epoch
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self._plan_epoch(epoch)
        return self._plan[i % self.per_epoch]

    def get(self, i: int, device: str, parts: int = 1, part: int = 0) -> tuple[torch.Tensor, ...]:
        rows = np.array_split(self.indices(i), parts)[part]
        return collate([self.data.ids[j] for j in rows], [self.data.roles[j] for j in rows], device)


# --- What a run trains and is tested on -----------------------------------------------------------

def load_data(cfg, enc: tiktoken.Encoding, raw: dict[str, bytes] | None = None,
              step_examples: int = 1) -> tuple[TokenizedSet, TokenizedSet, list[Example]]:
    """The (train, validation) tokenized sets and the test examples that train.py's flags (`cfg`) ask for. `raw`:
    the bytes of "data" and "eval_data" if the caller read them; a training set under `step_examples` is refused."""
    bad_lines: list[str] = []  # with --skip_bad_lines, "file:line: problem" of each skipped line
    if cfg.data:
        raw = raw or {k: read_input(getattr(cfg, k), f"--{k}") for k in ("data", "eval_data") if getattr(cfg, k)}
        examples, test = (read_examples(getattr(cfg, k), cfg.format, cfg.strip_calculator, cfg.skip_bad_lines,
                          bad_lines, raw.get(k)) if getattr(cfg, k) else [] for k in ("data", "eval_data"))
    else:
        examples, test = synthetic_split(cfg.n_train, cfg.n_test, cfg.data_seed, cfg.task)
    if cfg.untagged and (bad := [ex for ex in examples + test if "\n" in ex.answer or "####" in ex.answer]):
        raise DataError(f"{bad[0].source}: the untagged layout (--untagged; experiment.py's sft arm) scores the one "
                        f"line after the last '####', and this answer has a line break or '####'")
    train_examples, val_examples = split(examples, cfg.n_val, cfg.seed)
    if not val_examples:
        raise DataError(f"{cfg.data or 'synthetic task'}: {len(examples)} examples leave no validation set, which "
                        f"takes --n_val {cfg.n_val} but at most a tenth of them; use --n_val >= 1 and >= 10 examples")
    train_set = tokenize(train_examples, enc, cfg.block_size, not cfg.untagged, name=cfg.data or "synthetic train")
    val_set = tokenize(val_examples, enc, cfg.block_size, not cfg.untagged, name="validation")
    if len(train_set.ids) < step_examples:  # Batches would cut empty micro-batches
        raise DataError(f"{cfg.data or 'synthetic task'}: {len(train_set.ids)} training examples (once validation and "
                        f"too long ones are set apart), fewer than the {step_examples} of one optimizer step "
                        f"(--batch_size x --grad_accum x ranks); lower --batch_size or --grad_accum, or give more data")
    if bad_lines:
        train_set.summary.update(skipped_bad_lines=len(bad_lines), bad_lines=bad_lines[:10])
    test = test[:cfg.eval_limit] if cfg.eval_limit else test
    # A test prompt that fills the block leaves no room to answer: say so now, not after training.
    too_long = [ex for ex in test if len(enc.encode_ordinary(sftkey.prompt_head(ex.prompt))) >= cfg.block_size]
    if too_long:
        raise DataError(f"{too_long[0].source or 'test set'}: the prompt alone fills --block_size {cfg.block_size} "
                        f"tokens, leaving no room for a response ({len(too_long)} test prompts do); raise --block_size")
    differ = [ex.source or "test set" for ex in test
              if prompt_tokens_differ(enc, *sftkey.render(ex.prompt, ex.thinking, ex.answer, not cfg.untagged))]
    if differ:  # what sftkey.prompt_head's rule leaves: this encoding merging across the template
        print(f"warning: {differ[0]}: with encoding {enc.name} the test prompt tokenizes otherwise alone than before "
              f"its response ({len(differ)} test prompts do): evaluation feeds tokens never trained", file=sys.stderr)
    return train_set, val_set, test


def synthetic_split(n_train: int, n_test: int, data_seed: int, task: str = "arithmetic"
                    ) -> tuple[list[Example], list[Example]]:
    """(training, test) problems of the synthetic task. The test set, n_test distinct problems seeded by (data_seed,
    1), depends on --data_seed and --n_test alone (the first k the same for any n_test >= k). Training problems,
    seeded by (data_seed, 0), are never test ones and may repeat (rejecting repeats among 20,000 would use up short
    problems), as may the validation ones `split` carves from them: only the test set is scored."""
    test = synthetic_task(n_test, [data_seed, 1])
    examples = synthetic_task(n_train, [data_seed, 0], frozenset(ex.prompt for ex in test), distinct=False)
    if task == "parity":  # the same problems; the answer is a step of its own that the reasoning never writes
        return [[replace(ex, answer=("even", "odd")[int(ex.answer) % 2]) for ex in part] for part in (examples, test)]
    return examples, test
