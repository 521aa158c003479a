"""GPT-2 in Hugging Face's layout, both ways, as a checkpoint file; a reader of SFTKey can skip it. No
`transformers` needed. GPT-2's weights come in as an ordinary checkpoint for --init_from:

    python gpt2.py import checkpoints/gpt2 checkpoints/gpt2.pt --block_size 512
    python gpt2.py export out/gpt2_gsm8k/sftkey_tag/ckpt.pt exported/sftkey_gpt2

`import` reads a Hugging Face GPT-2 folder of any of the four sizes (model.safetensors, or pytorch_model.bin with
weights_only=True), renames its tensors to model.py's, transposes GPT-2's Conv1D weights into nn.Linear's layout,
crops the position table to --block_size, and writes a checkpoint that --init_from reads like any other (with
--encoding gpt2 and the shape flags the command prints). `export` writes DIR/config.json (a GPT2LMHeadModel's),
DIR/pytorch_model.bin and, when the optional `safetensors` package imports, DIR/model.safetensors, which
`transformers.GPT2LMHeadModel.from_pretrained(DIR)` reads, as does `import`. It is the import's inverse: block
weights transposed into Conv1D's (in, out), the output matrix tied to the token embedding, whose table keeps
GPT-2's 50,257 rows (a model trained from random weights has 50,304, the vocabulary rounded up to a multiple of
64; the 47 extra rows are no token's and are dropped, which leaves the logits of every real token as they were and
takes out of the softmax only what those rows held, which training pushes towards 0). n_positions is the model's
block_size. No tokenizer files are written: the tokenizer is GPT-2's own.

Files are never replaced without --overwrite, nor ever the file read or a folder, and each is written whole or not at
all (checkpoints.atomic_write; a stop signal waits for the file being written).
An export is read back and every weight compared with the checkpoint's, bit for bit. Bad input: one line, exit 2.
"""
from __future__ import annotations

if __name__ == "__main__":
    import startup  # noqa: F401  (first, before torch loads: a stop signal now ends in one line)

import argparse
import contextlib
import dataclasses
import json
import os
import pickle

import torch

import checkpoints as ckpts
import data as D
import runtime
from model import GPT, GPTConfig

GPT2_VOCAB, EOT = 50257, 50256  # GPT-2's tokens, the last of them <|endoftext|>
CONFIG, BIN, SAFETENSORS = "config.json", "pytorch_model.bin", "model.safetensors"  # a folder's files
_GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # n_embd -> n_head of GPT-2 small, medium, large, xl
# Hugging Face stores these as Conv1D, whose weight is (in, out): the transpose of nn.Linear's.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# Reading (import)
def gpt2_from_hf(path: str, block_size: int | None = None, dropout: float = 0.0, vocab: int | None = None) -> GPT:
    """GPT-2 (any of the four sizes) from a local Hugging Face checkpoint folder, in float32 on the CPU, its shape from
    the tensors; `block_size` crops the position table; `vocab` (the tokenizer's size) must be the checkpoint's."""
    tensors, source = _read_hf_tensors(path)
    with torch.device("meta"):  # no random initialisation: every tensor comes from the checkpoint
        model = GPT(_gpt2_config(tensors, path, source, dropout, block_size, vocab))
    state = _gpt2_state_dict(tensors, model, source)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign replaced both; tie them again
    return model


def _read_hf_tensors(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's tensors, keys without the optional "transformer." prefix, and the file read."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    st_file, bin_file = os.path.join(path, SAFETENSORS), os.path.join(path, BIN)
    try:
        from safetensors.torch import load_file
    except ImportError:
        load_file = None
    if os.path.isfile(st_file) and load_file is not None:
        source, read = st_file, load_file
    elif os.path.isfile(bin_file):  # weights_only: never unpickle code
        source, read = bin_file, lambda f: torch.load(f, map_location="cpu", weights_only=True)
    elif os.path.isfile(st_file):
        raise FileNotFoundError(f"{st_file}: reading it needs the safetensors package (pip install safetensors), "
                                f"or put a pytorch_model.bin beside it")
    else:
        raise FileNotFoundError(f"{path}: holds neither model.safetensors nor pytorch_model.bin "
                                f"(sharded checkpoints are not supported)")
    try:
        tensors = read(source)
    except Exception as err:  # truncated, foreign, or holding pickled objects other than tensors
        detail = str(err).splitlines()[0] if str(err) else "no details"
        if isinstance(err, pickle.UnpicklingError):  # not torch's advice on how to load it anyway
            detail = "the safe loader met something other than tensors; unpickling it could run code"
        raise ValueError(f"{source}: cannot be read as a checkpoint of tensors ({type(err).__name__}: "
                         f"{detail})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{source}: not a state dict of tensors")
    for name, t in tensors.items():  # numbers our checkpoints can hold (bool and int mask buffers are dropped later)
        if t.is_meta or t.layout != torch.strided or t.is_complex() or t.is_floating_point() and not t.isfinite().all():
            raise ValueError(f"{source}: tensor {name} is not finite real numbers held in memory ({t.dtype}, "
                             f"{t.layout}{', meta' if t.is_meta else ''})")
    names = [k.removeprefix("transformer.") for k in tensors]
    if len(set(names)) < len(names):  # "ln_f.weight" and "transformer.ln_f.weight": which one is meant?
        raise ValueError(f"{source}: a tensor is given twice, with and without the prefix 'transformer.'")
    return dict(zip(names, tensors.values())), source


def _gpt2_config(tensors: dict[str, torch.Tensor], path: str, source: str, dropout: float,
                 block_size: int | None, n_vocab: int | None) -> GPTConfig:
    if missing := [name for name in ("wte.weight", "wpe.weight") if name not in tensors]:
        raise ValueError(f"{source}: no tensor {missing[0]}; is it a GPT-2 checkpoint?")
    if bad := [name for name in ("wte.weight", "wpe.weight") if tensors[name].ndim != 2 or not len(tensors[name])]:
        raise ValueError(f"{source}: {bad[0]} is not a table of rows ({tuple(tensors[bad[0]].shape)})")
    vocab, n_embd = tensors["wte.weight"].shape
    if n_vocab is not None and vocab != n_vocab:
        raise ValueError(f"{path}: a vocabulary of {vocab} tokens, but the gpt2 encoding has {n_vocab}")
    n_layer = len({k.split(".")[1] for k in tensors if k.startswith("h.")})
    config_file = os.path.join(path, CONFIG)
    raw = D.read_input(config_file, "config") if os.path.lexists(config_file) else b"{}"
    try:
        hf = json.loads(raw)
    except ValueError as err:  # not JSON, or not UTF-8
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file}: not a JSON object of settings")
    # Variants whose arithmetic differs from GPT-2's would load and compute something else: refuse them by name.
    unsupported = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
                   "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,)}
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"{config_file}: {key}={hf[key]!r} is not supported (GPT-2 has {allowed[0]!r})")
    n_head = hf.get("n_head", _GPT2_HEADS.get(n_embd))
    if n_head is None:
        raise ValueError(f"{path}: n_head is not in the tensors' shapes and there is no config.json giving it "
                         f"(width {n_embd} is none of GPT-2's sizes {sorted(_GPT2_HEADS)})")
    if type(n_head) is not int or n_head < 1:  # 2.0 or true would make a checkpoint no command accepts
        raise ValueError(f"{config_file}: n_head {n_head!r} is not a whole number >= 1")
    if n_embd % n_head:
        raise ValueError(f"{path}: width {n_embd} is not a multiple of n_head {n_head}")
    positions = tensors["wpe.weight"].shape[0]
    block_size = positions if block_size is None else block_size
    if block_size > positions:
        raise ValueError(f"--block_size {block_size} exceeds the {positions} positions of {source}")
    return GPTConfig(vocab, block_size, n_layer, n_head, n_embd, dropout)


def _gpt2_state_dict(tensors: dict[str, torch.Tensor], model: GPT, source: str) -> dict[str, torch.Tensor]:
    """Hugging Face's names and layouts turned into `model`'s state dict (float32), with a clear error for a missing,
    unexpected or misshapen tensor (load_state_dict's is a wall of text)."""
    state = {}
    for key, tensor in tensors.items():
        if key == "lm_head.weight" and not torch.equal(tensor, tensors["wte.weight"]):  # GPT-2 ties it to wte
            raise ValueError(f"{source}: lm_head.weight differs from wte.weight; only tied GPT-2 is supported")
        if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):  # tied; causal-mask buffers
            continue
        tensor = tensor.float()
        state["transformer." + key] = tensor.t().contiguous() if key.endswith(CONV1D) else tensor.contiguous()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:model.config.block_size].clone()
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(k.removeprefix("transformer.") for k in expected.keys() - state.keys())
    unexpected = sorted(k.removeprefix("transformer.") for k in state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source}: not GPT-2's tensors: missing {missing[:5] or 'none'}, "
                         f"unexpected {unexpected[:5] or 'none'}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise ValueError(f"{source}: {key.removeprefix('transformer.')} has shape {tuple(state[key].shape)}, "
                             f"expected {tuple(shape)} (after transposing Conv1D weights)")
    return state


def import_hf(folder: str, path: str, block_size: int | None = None, dropout: float = 0.0,
              overwrite: bool = False, stop: runtime.StopSignal | None = None) -> GPT:
    """Write the GPT-2 of a Hugging Face `folder` as a checkpoint at `path` that --init_from reads (step 0); a `stop`
    signal received while it is written waits for it."""
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{path} exists: give --overwrite to replace it, or choose another file")
    if block_size is not None and block_size < 1:
        raise ValueError(f"--block_size {block_size} must be >= 1")
    if not 0 <= dropout < 1:
        raise ValueError(f"--dropout {dropout} must lie in [0, 1)")
    model = gpt2_from_hf(folder, block_size, dropout, GPT2_VOCAB)
    state = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
             "train_config": {"encoding": "gpt2"}, "step": 0}  # the encoding: --init_from checks it
    with stop.deferred() if stop else contextlib.nullcontext():  # in torch.save's writer it would be a failed write
        ckpts.atomic_write(path, lambda f: torch.save(state, f))
    return model


# Writing (export)
# Files a Hugging Face loader reads instead of, or besides, ours: a stale one would shadow the export.
SHADOWING = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# GPT-2's tanh-approximated GELU, both: GPT-2's own name (the formula computed step by step), which every GPT-2
# loader knows, then torch's own function, model.py's F.gelu(approximate="tanh"), which some loaders do not know.
# With transformers 5.25 the second gave our logits bit for bit, the first within 4e-6 (on logits up to 7).
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This project's state dict under Hugging Face's GPT2LMHeadModel names: Conv1D weights transposed, the
    embedding cut to GPT-2's 50,257 rows, no lm_head.weight (tied to transformer.wte.weight on loading)."""
    if not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]):
        raise ValueError("lm_head.weight differs from transformer.wte.weight: not a tied GPT-2")
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        if name.endswith(CONV1D):
            tensor = tensor.t()
        elif name == "transformer.wte.weight":
            tensor = tensor[:GPT2_VOCAB]
        out[name] = tensor.detach().to("cpu", torch.float32).contiguous().clone()  # own storage: safetensors
    return out


def hf_config(config: GPTConfig, activation: str = ACTIVATIONS[0]) -> dict:
    """config.json of a GPT2LMHeadModel of this shape. model.py's arithmetic is GPT-2's: tanh GELU, LayerNorm
    eps 1e-5, attention scaled by 1/sqrt(head width) and not by layer, biases, tied embeddings."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": GPT2_VOCAB,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None, "activation_function": activation,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "bos_token_id": EOT, "eos_token_id": EOT, "tie_word_embeddings": True, "use_cache": True,
            "torch_dtype": "float32"}


def checked_checkpoint(path: str) -> tuple[dict, GPTConfig]:
    """The checkpoint (the project's checks: checkpoints.read_checkpoint) and its model's shape, refused in
    one ValueError unless it is a GPT-2-vocabulary model a Hugging Face GPT-2 folder can hold."""
    ckpt = ckpts.read_checkpoint(path, None, "cpu")
    config = GPTConfig(**ckpt["model_config"])
    trained = ckpt.get("train_config") if isinstance(ckpt.get("train_config"), dict) else {}
    encoding = trained.get("encoding")
    if encoding != "gpt2":
        raise ValueError(f"{path}: trained with encoding {encoding or '(not recorded)'}, not gpt2: a Hugging Face "
                         f"GPT-2 folder means GPT-2's tokenizer, so only --encoding gpt2 models are exported")
    if config.vocab_size not in (GPT2_VOCAB, 64 * -(-GPT2_VOCAB // 64)):
        raise ValueError(f"{path}: a vocabulary of {config.vocab_size} rows, not GPT-2's {GPT2_VOCAB} (or "
                         f"{64 * -(-GPT2_VOCAB // 64)}, rounded up)")
    if not config.bias:
        raise ValueError(f"{path}: a model without biases; GPT-2 has them")
    return ckpt, config


def export(ckpt: dict, config: GPTConfig, out_dir: str, overwrite: bool = False,
           activation: str = ACTIVATIONS[0]) -> tuple[list[str], list[str]]:
    """Write the Hugging Face folder of a checked checkpoint (`checked_checkpoint`); return the paths written
    and those removed (an earlier export's files this one does not replace). Refuses to replace files unless
    `overwrite`."""
    state, hf = hf_state_dict(ckpt["model"]), hf_config(config, activation)
    try:
        from safetensors.torch import save as safetensors_bytes
    except ImportError:
        safetensors_bytes = None
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a folder")
    ours = [os.path.join(out_dir, name) for name in (CONFIG, BIN, SAFETENSORS, *SHADOWING)]
    found = [path for path in ours if os.path.lexists(path)]
    if found and not overwrite:
        raise ValueError(f"{out_dir} already holds {', '.join(os.path.basename(p) for p in found)}: give --overwrite "
                         f"to replace them, or choose another folder")
    if os.path.join(out_dir, CONFIG) in found:  # written last, it marks a whole export: none until this one is
        os.unlink(os.path.join(out_dir, CONFIG))
    files = {BIN: lambda f: torch.save(state, f)}
    if safetensors_bytes is not None:
        data = safetensors_bytes(state, metadata={"format": "pt"})  # "pt": what transformers looks for
        files[SAFETENSORS] = lambda f: f.write(data)
    written = [os.path.join(out_dir, name) for name in [*files, CONFIG]]
    for name, write in files.items():
        ckpts.atomic_write(os.path.join(out_dir, name), write)
    stale = [path for path in found if path not in written]  # they would shadow this export: remove them
    for path in stale:
        os.unlink(path)
    ckpts.write_json(os.path.join(out_dir, CONFIG), hf)  # last, so that a folder with a config.json is whole
    return written, stale


def verify(out_dir: str, ckpt: dict, config: GPTConfig) -> None:
    """Read the folder back (gpt2_from_hf) and compare every weight with the checkpoint's, bit for bit."""
    loaded = gpt2_from_hf(out_dir)
    if loaded.config != GPTConfig(GPT2_VOCAB, config.block_size, config.n_layer, config.n_head, config.n_embd):
        raise ValueError(f"{out_dir}: read back with another shape ({loaded.config}); the export is wrong")
    state = loaded.state_dict()
    for name, tensor in ckpt["model"].items():
        expected = tensor[:GPT2_VOCAB] if name in ("transformer.wte.weight", "lm_head.weight") else tensor
        if not torch.equal(state[name], expected.cpu()):
            raise ValueError(f"{out_dir}: {name} read back differs from the checkpoint's; the export is wrong")


# The command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    reading = commands.add_parser("import", help="a Hugging Face GPT-2 folder -> a checkpoint for --init_from")
    reading.add_argument("hf_dir", help="the Hugging Face folder (config.json, model.safetensors or pytorch_model.bin)")
    reading.add_argument("ckpt", help="the checkpoint file to write")
    reading.add_argument("--block_size", type=int, default=None, help="positions to keep, the --block_size to train "
                         "with (default: all of the checkpoint's, 1024 for GPT-2)")
    reading.add_argument("--dropout", type=float, default=0.0, help="the --dropout to train with (default: 0.0)")
    writing = commands.add_parser("export", help="a checkpoint of an --encoding gpt2 model -> a Hugging Face folder")
    writing.add_argument("ckpt", help="a checkpoint train.py wrote, of a model trained with --encoding gpt2")
    writing.add_argument("hf_dir", help="the folder to write (created if needed)")
    writing.add_argument("--activation", choices=ACTIVATIONS, default=ACTIVATIONS[0],
                         help="activation_function in config.json, both GPT-2's tanh GELU: gelu_new, GPT-2's own "
                              "name, which every GPT-2 loader knows, computes the formula step by step (logits "
                              "within about 4e-6 of ours); gelu_pytorch_tanh calls torch's, as model.py does "
                              "(transformers then gives our logits bit for bit), but older loaders do not know it "
                              "(default: %(default)r)")
    for command in (reading, writing):
        command.add_argument("--overwrite", action="store_true", help="replace the file (import) or files (export) "
                             "already there; an export also removes sharded-checkpoint indexes in HF_DIR, which "
                             "loaders would read instead")
    return parser


def run(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not args.hf_dir or not os.path.basename(args.ckpt):  # "" would mean the current folder, or no file name
        raise ValueError(f"give a folder for the Hugging Face files and a file for the checkpoint (got "
                         f"{args.hf_dir!r} and {args.ckpt!r})")
    folder = [os.path.join(args.hf_dir, name) for name in (CONFIG, BIN, SAFETENSORS, *SHADOWING)]
    for path in folder if args.command == "export" else [args.ckpt]:  # what it writes, checked before any work
        if os.path.lexists(path) and not (os.path.islink(path) or os.path.isfile(path)):  # a folder, a device
            raise ValueError(f"{path}: not a file; {args.command} replaces files only, give another path")
    if os.path.isfile(args.ckpt) and any(os.path.isfile(f) and os.path.samefile(f, args.ckpt) for f in folder):
        raise ValueError(f"{args.ckpt} is a file of {args.hf_dir} (the same file, by any name): {args.command} would "
                         f"replace what it reads; write to another path")
    # A stop signal (Ctrl-C, SIGTERM, SIGHUP) ends the command in one line, exit 130, after the files being written:
    # none is left half-written, no temporary is left (killed by a signal, atomic_write could not remove it).
    with runtime.StopSignal("the files written are whole; run the command again (with --overwrite)") as stop:
        if args.command == "import":
            c = import_hf(args.hf_dir, args.ckpt, args.block_size, args.dropout, args.overwrite, stop).config
            print(f"wrote {args.ckpt}: GPT-2 with {c.n_layer} layers, {c.n_embd} wide, {c.block_size} positions. "
                  f"Train from it with --init_from {args.ckpt} --encoding gpt2 --n_layer {c.n_layer} --n_head "
                  f"{c.n_head} --n_embd {c.n_embd} --block_size {c.block_size}"
                  + (f" --dropout {c.dropout}" if c.dropout else ""))
            return
        ckpt, config = checked_checkpoint(args.ckpt)
        with stop.deferred():
            written, removed = export(ckpt, config, args.hf_dir, args.overwrite, args.activation)
        verify(args.hf_dir, ckpt, config)
    print(f"wrote {', '.join(written)}" + (f"; removed {', '.join(removed)}" if removed else "")
          + ("" if any(p.endswith(SAFETENSORS) for p in written) else
             " (no model.safetensors: pip install safetensors to write one too)"))
    print(f"read back with gpt2.gpt2_from_hf: every weight equal to the checkpoint's (wte: its first {GPT2_VOCAB} "
          f"rows of {config.vocab_size}); n_positions {config.block_size}")


def main(argv: list[str] | None = None) -> None:
    runtime.command(lambda: run(argv))  # bad input: one line, exit 2; a failed write: one line, exit 1


if __name__ == "__main__":
    main()
