"""Show the tokens a run trains on, each with its role: what the loss of each stage sees.

    python show.py --n 3                                     # the default run's synthetic task
    python show.py --n 1 --data ../shared/gsm8k/train.jsonl --encoding gpt2 --block_size 512

It takes every train.py flag (paste a train.py command line and add --n), loads the data exactly as
that run would (`data.load_data`: the same split, tokenizer, template and dropped examples) and prints
the first N training examples token by token. Piped, each token is written `[R:text]`, R its role:
P prompt, T thinking, K key (the answer and end-of-text); newlines and other control characters are
written as escapes (`\\n`, `\\x07`), a backslash as `\\\\`, and a byte sequence that is not whole UTF-8 as
`\\xNN`. A token holding bytes of two roles (BPE merged across a template boundary, e.g. GPT-2's `><`
in `</Thinking><Answer>`) is marked `*` after its role letter; its role follows sftkey.tag's rule.
On a terminal, roles are colours and token boundaries alternate the background. Under each example:
its tokens per role and each stage's loss weight per role, with the number of supervised targets.
"""
from __future__ import annotations

if __name__ == "__main__":
    import startup  # noqa: F401  (first, before torch loads: a stop signal now ends in one line)

import argparse
import dataclasses
import os
import sys
import unicodedata

import tiktoken

import checkpoints as ckpts
import data as D
import runtime
import sftkey

LETTERS = {sftkey.PROMPT: "P", sftkey.THINK: "T", sftkey.KEY: "K"}
COLOURS = {sftkey.PROMPT: "90", sftkey.THINK: "36", sftkey.KEY: "32"}  # ANSI foregrounds: grey, cyan, green
BACKGROUNDS = ("", "48;5;236")  # alternate token by token, so that boundaries show
STRADDLE, RESET = "4;1", "\033[0m"  # underlined and bold
ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
WIDTH = 120  # plain output wraps its lines at this many characters (and after every newline token)


def visible(piece: bytes) -> str:
    """A token's bytes as printable text: escapes for control and invisible characters (a space stays a
    space), \\xNN for each byte of a character that is cut between two tokens."""
    out = []
    for ch in piece.decode("utf-8", "surrogateescape"):  # a byte that is not whole UTF-8: U+DC80..U+DCFF
        if 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch in ESCAPES:
            out.append(ESCAPES[ch])
        elif ch != " " and (not ch.isprintable() or unicodedata.category(ch) in ("Cf", "Zs", "Zl", "Zp")):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x80 else f"\\u{ord(ch):04x}" if ord(ch) < 0x10000
                       else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class Token:
    text: str  # as `visible` writes it
    role: int
    straddles: bool  # holds bytes of two roles' spans (sftkey.tag decided its role)
    newline: bool  # its bytes hold a newline: the display breaks its line after it


def example_tokens(example: D.Example, ids: list[int], roles: list[int], enc: tiktoken.Encoding,
                   tagged: bool = True) -> list[Token]:
    """The tokens of one tokenized example (`ids` and `roles` as data.tokenize made them, end-of-text last),
    each with whether it straddles a boundary: its byte range in the rendered text, compared with the byte
    offsets where the thinking and the Key start."""
    text, spans = sftkey.render(example.prompt, example.thinking, example.answer, tagged)
    boundaries = [len(text[:start].encode("utf-8")) for start, _, _ in spans[1:]]
    pieces = [enc.decode_single_token_bytes(i) for i in ids]
    if b"".join(pieces[:-1]) != text.encode("utf-8") or ids[-1] != enc.eot_token:
        raise ValueError(f"{example.source or 'an example'}: its tokens are not the rendered text and end-of-text; "
                         f"was it tokenized with encoding {enc.name} and tagged={tagged}?")
    tokens, start = [], 0
    for piece, role in zip(pieces[:-1], roles):
        end = start + len(piece)
        tokens.append(Token(visible(piece), role, any(start < b < end for b in boundaries), b"\n" in piece))
        start = end
    return tokens + [Token(visible(pieces[-1]), roles[-1], False, False)]  # <|endoftext|>


def token_text(token: Token, index: int, color: bool) -> str:
    """`[R:text]` (R* when it straddles) in plain text; coloured by role, boundaries by background, on a terminal."""
    if not color:
        return f"[{LETTERS[token.role]}{'*' * token.straddles}:{token.text}]"
    codes = [COLOURS[token.role], BACKGROUNDS[index % 2]] + [STRADDLE] * token.straddles
    return f"\033[{';'.join(c for c in codes if c)}m{token.text}{RESET}"


def token_lines(tokens: list[Token], color: bool, width: int = WIDTH) -> list[str]:
    """The tokens in lines: a break after each token holding a newline, and before one that would pass
    `width` characters (counted as displayed, without colour codes)."""
    lines, line, shown = [], [], 0
    for index, token in enumerate(tokens):
        size = len(token.text) + (0 if color else 4 + token.straddles)  # "[R:" and "]"
        if line and shown + size > width:
            lines, line, shown = lines + ["".join(line)], [], 0
        line.append(token_text(token, index, color))
        shown += size
        if token.newline:
            lines, line, shown = lines + ["".join(line)], [], 0
    return lines + ["".join(line)] * bool(line)


def legend(color: bool) -> str:
    if color:
        roles = ", ".join(f"\033[{COLOURS[r]}m{name}{RESET}" for r, name in enumerate(sftkey.ROLE_NAMES))
        return (f"roles: {roles} (the answer and end-of-text); token boundaries alternate the background;\n"
                f"\033[{STRADDLE}munderlined{RESET}: a token holding bytes of two roles (any Key byte makes it key, "
                f"else any prompt byte prompt)")
    return ("[P:…] prompt, [T:…] thinking, [K:…] key (the answer and end-of-text); escapes: \\n newline, "
            "\\\\ backslash, \\xNN a byte;\n"
            "[R*:…] a token holding bytes of two roles (any Key byte makes it K, else any prompt byte P)")


def show_examples(tokenized: D.TokenizedSet, enc: tiktoken.Encoding, n: int,
                  weights_by_stage: dict[str, tuple[float, float, float]], color: bool = False,
                  tagged: bool = True) -> str:
    """The first `n` examples of a tokenized set, token by token with roles (see the module's docstring),
    each followed by its tokens per role and, per stage (name -> loss weights of prompt, thinking, key),
    the weight of each role and how many of its targets carry a loss (position t predicts token t+1, so
    the first token is never a target). train.py can print this for a --show_roles N flag."""
    blocks = [legend(color)]
    for k in range(min(n, len(tokenized.ids))):
        example, ids, roles = tokenized.examples[k], tokenized.ids[k].tolist(), tokenized.roles[k].tolist()
        tokens = example_tokens(example, ids, roles, enc, tagged)
        counts = [roles.count(r) for r in (sftkey.PROMPT, sftkey.THINK, sftkey.KEY)]
        straddling = sum(t.straddles for t in tokens)
        where = f" ({example.source})" if example.source else ""
        lines = [f"--- example {k + 1} of {len(tokenized.ids)}{where}: {len(ids)} tokens ---",
                 *token_lines(tokens, color),
                 f"tokens: prompt {counts[0]}, thinking {counts[1]}, key {counts[2]} (end-of-text included); "
                 f"straddling {straddling}"]
        name_width = max(map(len, weights_by_stage), default=0)
        for name, weights in weights_by_stage.items():
            supervised = sum(weights[r] != 0 for r in roles[1:])
            per_role = ", ".join(f"{role} {w:g}" for role, w in zip(sftkey.ROLE_NAMES, weights))
            lines.append(f"loss {name:<{name_width}}  weights {per_role}: {supervised} of {len(ids) - 1} targets "
                         f"supervised")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags (one per TrainConfig field) and show.py's own."""
    import train  # here, not at the top: train.py may import show_examples (--show_roles) without a cycle
    parser = runtime.flag_parser(train.TrainConfig, __doc__)
    own = parser.add_argument_group("show.py (the flags above are train.py's: only those of the data, the "
                                    "tokenizer and the loss weights change what is shown)")
    own.add_argument("--n", type=int, default=3, help="how many examples to show (default: %(default)r)")
    own.add_argument("--split", choices=("train", "validation"), default="train",
                     help="the training set, or the validation set carved from it (default: %(default)r)")
    own.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                     help="ANSI colours: auto = when writing to a terminal (default: %(default)r)")
    return parser


def show(argv: list[str] | None = None) -> str:
    """What the command line prints: the set's summary (runtime.format_summary), then `show_examples`."""
    import train
    args = runtime.parse_flags(build_parser(), argv)
    n, split, color = args.pop("n"), args.pop("split"), args.pop("color")
    if n < 0:
        raise ValueError(f"--n {n}: must be a whole number >= 0")
    cfg = runtime.check_config(train.TrainConfig(**args))
    inputs = ckpts.read_inputs(cfg)  # as train.py reads them: --init_from's stage names the stages after it
    enc = D.get_encoding(cfg.encoding, inputs.raw.get("encoding"))
    train_set, val_set, _ = D.load_data(cfg, enc, inputs.raw)
    shown = train_set if split == "train" else val_set
    stages = {stage.name: stage.weights for stage in train.plan_stages(cfg, inputs.origin[0])}
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    examples = show_examples(shown, enc, n, stages, use_color, not cfg.untagged)
    return runtime.format_summary(shown.summary) + "\n" + examples


def print_to_reader(text: str) -> None:
    """Print; a reader that stops early (`| head`) has what it wanted: no error, and nothing left to flush at exit."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> None:
    runtime.command(lambda: print_to_reader(show(argv)))  # bad flags or data: one line, exit 2


if __name__ == "__main__":
    main()
