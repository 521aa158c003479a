"""Ask a trained checkpoint your own questions: its response, whether it has the format, the answer it gives.

    python sample.py --ckpt out/sftkey_tag/ckpt.pt "Q: 7+5-3" "Q: 2+2"
    python sample.py --ckpt out/sftkey_tag/ckpt.pt --file prompts.txt --temperature 0.8 --top_k 20

Each prompt is fed as training and evaluation feed it (`sftkey.prompt_head`: trailing whitespace dropped,
then a newline), in the tokenizer recorded in the checkpoint (a tokenizer file must hold the bytes its run
hashed: another file at that path is refused). The checkpoint is loaded with the project's
checks (`checkpoints.read_checkpoint`: weights_only, this model's float32 tensors). Decoding is greedy by
default, `model.GPT.generate` as evaluation runs it, in the dtype the checkpoint's run computed in (float32
where this device would only emulate bfloat16; in bfloat16 the prompts generated beside one can change a few answers,
as in evaluation, which batches by length); --temperature > 0 samples instead (optionally from the
--top_k most likely tokens), reproducibly from --seed. Either way only ids the tokenizer can decode are
ever chosen (`data.generable_ids`), and a response ends at end-of-text or when the prompt and response
fill block_size + 1 tokens. Bad input ends in one line starting with "error:" and exit code 2.
"""
from __future__ import annotations

if __name__ == "__main__":
    import startup  # noqa: F401  (first, before torch loads: a stop signal now ends in one line)

import argparse
import math
import sys
from dataclasses import dataclass

import tiktoken
import torch

import checkpoints as ckpts
import data as D
import runtime
import sftkey
from model import GPT, GPTConfig


@dataclass
class Reply:
    prompt: str
    ids: list[int]  # generated, end-of-text included when produced
    response: str  # the text before end-of-text
    ended: bool  # whether it closed with end-of-text
    format_ok: bool | None  # None: an untagged checkpoint, which has no format to check
    answer: str | None  # sftkey.extract_answer's, None when it gives none


def load(path: str, device: str, encoding: str = "", dtype: str = "auto") -> tuple[GPT, tiktoken.Encoding, bool,
                                                                              torch.dtype]:
    """The checkpoint's model (in eval mode on `device`), its tokenizer (`encoding`, else the one its run
    recorded), whether it was trained on the tagged layout, and the dtype to compute in (`dtype`; "auto": the
    run's, float32 where `device` would emulate bfloat16; an older run's "auto": resolved as train.py does)."""
    ckpt = ckpts.read_checkpoint(path, None, "cpu")
    trained = ckpt.get("train_config") if isinstance(ckpt.get("train_config"), dict) else {}
    name = encoding or trained.get("encoding")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: records no tokenizer (train_config.encoding); give --encoding")
    try:
        tokenizer = ckpts.read_inputs(argparse.Namespace(data="", eval_data="", encoding=name, init_from=""))
    except D.DataError as err:  # the file the run recorded, not an --encoding the user gave: named as such
        if encoding:
            raise
        raise ValueError(f"{path}: the tokenizer file its run recorded, {name}: {str(err).partition(': ')[2]}; "
                         f"give --encoding with the file's path") from None
    hashes = ckpt.get("file_hashes") if isinstance(ckpt.get("file_hashes"), dict) else {}
    enc = D.get_encoding(name, tokenizer.raw.get("encoding"))
    recorded = trained.get("encoding", name)  # a GPT-2 import from before it recorded "gpt2": --encoding says
    was_file = isinstance(recorded, str) and D.is_tokenizer_file(recorded)
    if recorded != name and not (tokenizer.sha256 and was_file):  # a file for a file: its sha256 (if any) decides below
        raise ValueError(f"--encoding {name}: {path} was trained with {recorded}, whose token ids differ; leave "
                         f"--encoding out to use that")
    for flag, digest in tokenizer.sha256.items():  # a tokenizer file: it must be the one the run trained with
        if not isinstance(hashes.get(flag), str):
            print(f"note: {path} records no sha256 of its tokenizer file; {name} is used as it is now",
                  file=sys.stderr)
        elif hashes[flag] != digest:
            raise ValueError(f"--encoding {name}: not the tokenizer file {path} was trained with (sha256 "
                             f"{digest[:12]}…, the run's {hashes[flag][:12]}…)")
    config = GPTConfig(**ckpt["model_config"])
    if config.vocab_size not in (enc.n_vocab, 64 * math.ceil(enc.n_vocab / 64)):
        raise ValueError(f"{path}: a vocabulary of {config.vocab_size} rows, which encoding {enc.name} "
                         f"({enc.n_vocab} tokens) did not make")
    model = GPT(config)
    model.load_state_dict(ckpt["model"])  # float32 and these shapes: read_checkpoint checked
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as err:  # no such device here (an MPS-less Mac's "mps", "cuda:7", ...)
        raise ValueError(f"--device {device}: cannot run there ({str(err).splitlines()[0]})") from None
    run_dtype = trained.get("dtype") if trained.get("dtype") in ("float32", "bfloat16") else "auto"
    run_dtype = "float32" if run_dtype == "bfloat16" and not runtime.native_bf16(device) else run_dtype  # else slow
    flags = argparse.Namespace(device=device, n_embd=config.n_embd, dtype=run_dtype if dtype == "auto" else dtype)
    return model.eval(), enc, trained.get("untagged") is not True, runtime.resolve_device(flags)[1]


def prompt_ids(enc: tiktoken.Encoding, prompts: list[str], block_size: int,
               labels: list[str] | None = None) -> list[list[int]]:
    """The tokens of each prompt as training fed them, or a ValueError for an empty or an overlong one, naming it
    by its label ("prompt 2", "prompts.txt:7"; by default its place among the arguments)."""
    out = []
    for number, prompt in enumerate(prompts, 1):
        label = labels[number - 1] if labels else f"prompt {number}"
        if not prompt.strip():
            raise ValueError(f"{label} is empty")
        if any("\ud800" <= ch <= "\udfff" for ch in prompt):  # an argument's invalid UTF-8: tiktoken would feed U+FFFD
            raise ValueError(f"{label}: not valid UTF-8 (as --file refuses it)")
        ids = enc.encode_ordinary(sftkey.prompt_head(prompt))
        if len(ids) >= block_size:
            raise ValueError(f"{label} ({prompt[:40]!r}{'…' * (len(prompt) > 40)}) is {len(ids)} tokens "
                             f"with its newline: it fills the model's block_size of {block_size}, leaving no room "
                             f"for a response")
        out.append(ids)
    return out


@torch.no_grad()
def sample(model: GPT, prompt: list[int], max_new_tokens: int, stop_token: int, allowed: torch.Tensor,
           temperature: float, top_k: int, generator: torch.Generator) -> list[int]:
    """One prompt's continuation, each token drawn from softmax(logits / temperature) over the `allowed`
    ids (the `top_k` most likely of them when top_k > 0), by a full forward pass over the whole sequence.
    Stops as `GPT.generate` does: at `stop_token` (kept), after `max_new_tokens`, or once prompt and
    response hold block_size + 1 tokens (the last one predicted, never fed back)."""
    device, block = model.transformer.wte.weight.device, model.config.block_size
    budget = max(0, min(max_new_tokens, block + 1 - len(prompt)))
    seq, out = list(prompt), []
    while len(out) < budget:
        hidden = model(torch.tensor([seq], device=device))[0, -1]  # at most block_size tokens: see budget
        logits = (model.lm_head.weight @ hidden).float().masked_fill(~allowed, float("-inf"))
        # The best at 0, the others below: a tiny temperature sends only them to -inf (float32's least normal
        # number: a temperature that rounds to 0 would divide the best by 0; MPS has no float64). A huge one is
        # float32's largest: one that rounds to inf would turn the disallowed ids' -inf into NaN (-inf / inf).
        f32 = torch.finfo(torch.float32)
        logits = (logits - logits.max()) / min(max(temperature, f32.tiny), f32.max)
        if top_k:
            kth = torch.topk(logits, min(top_k, int(allowed.sum()))).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        out.append(token)
        seq.append(token)
        if token == stop_token:
            break
    return out


def respond(model: GPT, enc: tiktoken.Encoding, prompts: list[str], tagged: bool = True,
            max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
            batch_size: int = 16, dtype: torch.dtype = torch.float32, labels: list[str] | None = None) -> list[Reply]:
    """Each prompt's reply: greedy (`GPT.generate`, `batch_size` prompts at a time) at temperature 0,
    else sampled (one seeded generator for the whole call), under `dtype` autocast. max_new_tokens 0: up to the
    block's limit. `labels` name the prompts in errors."""
    device = model.transformer.wte.weight.device
    ids = prompt_ids(enc, prompts, model.config.block_size, labels)
    limit = max_new_tokens or model.config.block_size + 1
    allowed = D.generable_ids(enc, model.config.vocab_size).to(device)
    with runtime.autocast(str(device), dtype):
        if temperature > 0:
            generator = torch.Generator(device=device).manual_seed(seed)
            outs = [sample(model, p, limit, enc.eot_token, allowed, temperature, top_k, generator) for p in ids]
        else:
            outs = [out for start in range(0, len(ids), batch_size)
                    for out in model.generate(ids[start:start + batch_size], limit, enc.eot_token, allowed=allowed)]
    replies = []
    for prompt, out in zip(prompts, outs):
        ended = bool(out) and out[-1] == enc.eot_token
        response = enc.decode(out[:-1] if ended else out)
        replies.append(Reply(prompt, out, response, ended, sftkey.format_ok(response, ended) if tagged else None,
                             sftkey.extract_answer(response, tagged)))
    return replies


def describe(reply: Reply) -> str:
    ending = "<|endoftext|>" if reply.ended else f"\n(no end-of-text: stopped after {len(reply.ids)} tokens)"
    fmt = {True: "ok", False: "not ok", None: "n/a (an untagged checkpoint)"}[reply.format_ok]
    answer = "none found" if reply.answer is None else repr(reply.answer)
    return f"prompt:   {reply.prompt}\nresponse: {reply.response}{ending}\nformat:   {fmt}\nanswer:   {answer}"


def read_prompts(path: str) -> dict[str, str]:
    """One prompt a line (blank lines skipped), by "path:line"; a line's trailing "\\r" and a leading byte-order mark
    dropped. "-" reads standard input (`... | python sample.py --ckpt C --file -`)."""
    raw = sys.stdin.buffer.read() if path == "-" else D.read_input(path, "--file")
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark, as data.py drops it
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"--file {path}:{line}: not valid UTF-8") from None
    prompts = {f"{path}:{number}": line.removesuffix("\r") for number, line in enumerate(lines, 1) if line.strip()}
    if not prompts:
        raise ValueError(f"--file {path}: holds no prompt (one a line)")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="prompts, each one argument (quote them)")
    parser.add_argument("--ckpt", required=True, help="a checkpoint train.py wrote (e.g. out/sftkey_tag/ckpt.pt)")
    parser.add_argument("--file", default="", help="a text file of prompts, one a line (after the arguments'); "
                        "- reads them from standard input")
    parser.add_argument("--max_new_tokens", type=int, default=0,
                        help="tokens a response may have; 0 = as evaluation: until prompt and response fill "
                             "block_size + 1 (default: %(default)r)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy, as evaluation; > 0 samples from softmax(logits / T) (default: %(default)r)")
    parser.add_argument("--top_k", type=int, default=0,
                        help="with --temperature: sample from the K most likely tokens only; 0 = all "
                             "(default: %(default)r)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: %(default)r)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="greedy: prompts generated together (default: %(default)r)")
    parser.add_argument("--encoding", default="",
                        help="the tokenizer, for a checkpoint that records none (an early GPT-2 import) or a "
                             "tokenizer file given by another path (its sha256 must match where the run recorded "
                             "it); empty = the one the run recorded (default: %(default)r)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="compute dtype; auto = the one the checkpoint's run computed in, as evaluation "
                             "ran (float32 where bfloat16 would be emulated) (default: %(default)r)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ... "
                                                          "(default: %(default)r)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    problems = [f"--{name} {value}: {rule}" for name, value, ok, rule in [
        ("max_new_tokens", args.max_new_tokens, args.max_new_tokens >= 0, "must be a whole number >= 0"),
        ("temperature", args.temperature, 0 <= args.temperature < math.inf, "must be a finite number >= 0"),
        ("top_k", args.top_k, args.top_k >= 0, "must be a whole number >= 0"),
        ("seed", args.seed, 0 <= args.seed < 2 ** 63, "must be a whole number >= 0"),
        ("batch_size", args.batch_size, args.batch_size >= 1, "must be a whole number >= 1")] if not ok]
    if args.top_k and not args.temperature:
        problems.append(f"--top_k {args.top_k} samples: give a --temperature > 0 too (0 is greedy)")
    if not args.prompts and not args.file:
        problems.append("no prompt: give prompts as arguments, or --file")
    if problems:
        raise ValueError("; ".join(problems))


def run(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if problem := runtime.device_problem(device, ("cpu", "cuda", "mps")):
        raise ValueError(problem)
    prompts = {f"prompt {number}": prompt for number, prompt in enumerate(args.prompts, 1)}
    prompts.update(read_prompts(args.file) if args.file else {})
    model, enc, tagged, dtype = load(args.ckpt, device, args.encoding, args.dtype)
    replies = respond(model, enc, list(prompts.values()), tagged, args.max_new_tokens, args.temperature, args.top_k,
                      args.seed, args.batch_size, dtype, list(prompts))
    print("\n\n".join(describe(reply) for reply in replies))


def main(argv: list[str] | None = None) -> None:
    runtime.command(lambda: run(argv))  # bad input: one line, exit 2


if __name__ == "__main__":
    main()
