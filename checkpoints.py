"""Checkpoint files for train.py: atomic writes, safe reads, resume state, and GPT-2's weights.

Nothing here is SFTKey: a reader of the method can skip this file. It holds
- `save_checkpoint` / `write_json`: written to a temporary file, then renamed, so an interrupted
  write leaves the previous file intact;
- `read_checkpoint` / `load_checkpoint`: `torch.load(weights_only=True)` (a checkpoint never runs
  code), with one clear message for a foreign, truncated or mismatched file;
- `StageCheckpoint`: the one hook the training loop calls to resume a stage and to write its
  checkpoints (every --ckpt_interval steps, and when a stop signal arrives);
- `gpt2_from_hf`: GPT-2 from a Hugging Face checkpoint folder, converted to model.py's names.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import time
import warnings

import torch

from model import GPT, GPTConfig
from runtime import PRETRAINED, Dist, Interrupted, StopSignal

# The flag that sets each model-config field, to name it when a checkpoint does not match.
_CONFIG_FLAGS = {"vocab_size": "--encoding", "block_size": "--block_size", "n_layer": "--n_layer",
                 "n_head": "--n_head", "n_embd": "--n_embd", "dropout": "--dropout"}


def write_text(path: str, text: str) -> None:
    """Written whole or not at all: to a temporary file, then renamed over `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


def save_checkpoint(path: str, model: GPT, optimizer, cfg, step: int, extra: dict | None = None) -> None:
    """Tensors and plain values only (loadable with weights_only=True), written to a temporary file
    and then renamed, so a crash mid-write leaves the previous checkpoint intact. The RNG states
    (CPU and every CUDA device) go in too, so a run with dropout resumes exactly."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
             "model_config": dataclasses.asdict(model.config), "train_config": dataclasses.asdict(cfg),
             "step": step, "rng": torch.get_rng_state(),
             # only once CUDA is in use: asking earlier would start a CUDA context in a CPU run
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [], **(extra or {})}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def restore_rng(ckpt: dict) -> None:
    """The CPU and CUDA RNG states a checkpoint holds (read with map_location, they may sit on a GPU:
    the setters want CPU tensors). States of GPUs this machine lacks are left out."""
    torch.set_rng_state(ckpt["rng"].cpu())
    if ckpt.get("cuda_rng") and torch.cuda.is_available():
        for index, state in enumerate(ckpt["cuda_rng"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), index)


def read_checkpoint(path: str, expected: GPTConfig, device: str, encoding: str | None = None,
                    exact_vocab: int | None = None) -> dict:
    """A checkpoint's contents, after checking its model shape (and `encoding`, if given) matches the flags.

    A checkpoint whose vocabulary is `exact_vocab` (the encoding's own size, not rounded up: one
    trained from GPT-2's weights) is accepted as well as the rounded size `expected` holds.

    Loading never runs code: torch.load with weights_only=True accepts tensors and plain Python
    values only, and anything else is refused with a ValueError naming the file and the problem.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol draws a warning; the refusal below says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=device, weights_only=True)  # never unpickle code
    except pickle.UnpicklingError as err:  # weights_only met something other than tensors and plain values
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(f"{path}: refused to load: it holds a pickled Python object{what} that is not a tensor or "
                         f"a plain value, and unpickling it could run code. Only checkpoints holding tensors and "
                         f"plain values, as this project writes them, are loaded.") from None
    except Exception as err:  # a truncated or foreign file: the loader's own errors say little
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no details'})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_config"), dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not an sftkey checkpoint (no 'model' and 'model_config' entries)")
    try:
        saved = GPTConfig(**ckpt["model_config"])
    except TypeError as err:
        raise ValueError(f"{path}: its model_config does not describe this project's GPT ({err})") from None
    if exact_vocab is not None and saved.vocab_size == exact_vocab:
        expected = dataclasses.replace(expected, vocab_size=exact_vocab)
    diffs = [f"{_CONFIG_FLAGS.get(k, k)}: {k}={getattr(saved, k)} in the checkpoint but {getattr(expected, k)} here"
             for k in vars(saved) if getattr(saved, k) != getattr(expected, k)]
    trained_with = (ckpt.get("train_config") or {}).get("encoding")
    if encoding is not None and trained_with is not None and trained_with != encoding:
        diffs.append(f"--encoding: {trained_with} in the checkpoint but {encoding} here")
    if diffs:
        raise ValueError(f"{path} does not match the flags: " + "; ".join(diffs))
    return ckpt


def load_checkpoint(path: str, expected: GPTConfig, device: str, encoding: str | None = None,
                    exact_vocab: int | None = None) -> tuple[GPT, dict]:
    """A model with a checkpoint's weights (see read_checkpoint for the checks), and the checkpoint."""
    ckpt = read_checkpoint(path, expected, device, encoding, exact_vocab)
    model = GPT(GPTConfig(**ckpt["model_config"])).to(device)  # equal to `expected` but perhaps its vocabulary
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as err:  # missing, extra or misshapen tensors
        detail = " ".join(str(err).split())
        raise ValueError(f"{path}: its weights do not fit the model ({detail[:300]})") from None
    return model, ckpt




def model_config(cfg, enc) -> GPTConfig:
    """The shape the flags ask for, the vocabulary rounded up to a multiple of 64 (efficient matmuls)."""
    return GPTConfig(64 * math.ceil(enc.n_vocab / 64), cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                     cfg.dropout)


def build_model(cfg, enc, device: str) -> GPT:
    """Random weights, an --init_from checkpoint's, or GPT-2's (--init_from gpt2:DIR, which keeps GPT-2's
    shape and its 50,257-token vocabulary, as do checkpoints trained from it)."""
    if cfg.init_from.startswith(PRETRAINED):
        return load_gpt2(cfg.init_from, enc, cfg.block_size, cfg.dropout).to(device)
    if cfg.init_from:
        return load_checkpoint(cfg.init_from, model_config(cfg, enc), device, cfg.encoding, enc.n_vocab)[0]
    return GPT(model_config(cfg, enc)).to(device)


def init_origin(cfg) -> tuple[str, int]:
    """The stage an --init_from checkpoint ended and its position in the data stream (steps read), so a
    stage run by hand from it is named by its history and reads on where it stopped; ("", 0) otherwise."""
    if not cfg.init_from or cfg.init_from.startswith(PRETRAINED):
        return "", 0
    ckpt = torch.load(cfg.init_from, map_location="cpu", weights_only=True, mmap=True)  # build_model checked it
    return str(ckpt.get("stage", "")), int(ckpt.get("stream_start", 0)) + int(ckpt.get("step", 0))


class StageCheckpoint:
    """One stage's checkpoint as the training loop sees it: what to resume from, when to write.

    `saved` is this stage's checkpoint when resuming (optimizer, step and RNG are restored from it);
    `extra` is stored in every write (what run() needs to resume the stages around this one). With
    no `path` nothing is written (experiment.py's arms).
    """

    def __init__(self, path: str | None, cfg, stage: str, log: list[dict], saved: dict | None = None,
                 extra: dict | None = None, stop: StopSignal | None = None, dist: Dist | None = None):
        self.path, self.cfg, self.stage, self.log, self.saved = path, cfg, stage, log, saved
        self.extra, self.stop, self.dist = extra or {}, stop, dist or Dist()
        self.start = time.time() - (saved.get("elapsed", 0.0) if saved else 0.0)

    def restore(self, optimizer: torch.optim.Optimizer) -> int:
        """The step to start from: 0, or the saved one with the optimizer and RNG as they were."""
        if self.saved is None:
            return 0
        optimizer.load_state_dict(self.saved["optimizer"])
        restore_rng(self.saved)
        return self.saved["step"]

    def elapsed(self) -> float:
        """Seconds of training in this stage, interrupted runs included."""
        return time.time() - self.start

    def save(self, step: int, model: GPT, optimizer) -> None:
        if self.path and self.dist.master:
            save_checkpoint(self.path, model, optimizer, self.cfg, step,
                            {"stage": self.stage, "log": self.log, **self.extra, "elapsed": self.elapsed()})

    def after_step(self, done: int, iters: int, model: GPT, optimizer) -> None:
        """Write every --ckpt_interval steps; on a stop signal write, then raise Interrupted."""
        stopping = self.stop is not None and self.stop.requested(self.dist)
        if stopping or (self.cfg.ckpt_interval and done % self.cfg.ckpt_interval == 0 and done < iters):
            self.save(done, model, optimizer)
        if stopping:
            raise Interrupted(f"{self.stage} stopped by signal after step {done} of {iters}; checkpoint written "
                              f"to {self.path}. Resume with the same command and --resume.")


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2 checkpoints

def load_gpt2(init_from: str, enc, block_size: int, dropout: float) -> GPT:
    """GPT-2 for --init_from gpt2:DIR: its shape from the checkpoint (--n_layer, --n_head and --n_embd
    do not apply), the position table cropped to --block_size, the tokenizer GPT-2's own."""
    if enc.name != "gpt2":
        raise ValueError(f"--init_from {init_from} needs --encoding gpt2 (GPT-2's own tokenizer), "
                         f"got --encoding {enc.name}")
    model = gpt2_from_hf(init_from[len(PRETRAINED):], block_size=block_size, dropout=dropout)
    if model.config.vocab_size != enc.n_vocab:
        raise ValueError(f"--init_from {init_from}: a vocabulary of {model.config.vocab_size} tokens, but the "
                         f"gpt2 encoding has {enc.n_vocab}")
    return model


def gpt2_from_hf(path: str, block_size: int | None = None, dropout: float = 0.0) -> GPT:
    """GPT-2 from a local Hugging Face checkpoint folder, in float32 on the CPU.

    Reads `model.safetensors` (when the optional `safetensors` package imports) or
    `pytorch_model.bin` (torch.load with weights_only=True), any of the four GPT-2 sizes: the
    shape comes from the tensors (layers from the h.N blocks, width and vocabulary from wte,
    positions from wpe) and n_head from config.json, or GPT-2's own table when it is absent.
    `block_size` crops the position table (it cannot exceed the checkpoint's). Hugging Face's
    `transformers` is not needed.
    """
    tensors, source = _read_hf_tensors(path)
    config = _gpt2_config(tensors, path, source, dropout)
    if block_size is not None:
        if block_size > config.block_size:
            raise ValueError(f"--block_size {block_size} exceeds the {config.block_size} positions of {source}")
        config.block_size = block_size
    state = _gpt2_state_dict(tensors, config, source)
    with torch.device("meta"):  # no random initialisation: every tensor comes from the checkpoint
        model = GPT(config)
    _check_names_and_shapes(state, model, source)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign replaced both; tie them again
    return model


_GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # n_embd -> n_head of GPT-2 small, medium, large, xl
# Hugging Face stores these as Conv1D, whose weight is (in, out): the transpose of nn.Linear's.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _read_hf_tensors(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's tensors, keys without the optional "transformer." prefix, and the file read."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"gpt2:{path}: no such directory")
    st_file, bin_file = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
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
        raise FileNotFoundError(f"gpt2:{path}: holds neither model.safetensors nor pytorch_model.bin "
                                f"(sharded checkpoints are not supported)")
    try:
        tensors = read(source)
    except Exception as err:  # truncated, foreign, or holding pickled objects other than tensors
        raise ValueError(f"{source}: cannot be read as a checkpoint of tensors ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no details'})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{source}: not a state dict of tensors")
    return {k.removeprefix("transformer."): t for k, t in tensors.items()}, source


def _gpt2_config(tensors: dict[str, torch.Tensor], path: str, source: str, dropout: float) -> GPTConfig:
    for name in ("wte.weight", "wpe.weight"):
        if name not in tensors:
            raise ValueError(f"{source}: no tensor {name}; is it a GPT-2 checkpoint?")
    vocab, n_embd = tensors["wte.weight"].shape
    n_layer = len({k.split(".")[1] for k in tensors if k.startswith("h.")})
    hf = {}
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            hf = json.load(f)
    # Variants whose arithmetic differs from GPT-2's would load without error and compute
    # something else: refuse them by name.
    unsupported = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
                   "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,)}
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"{config_file}: {key}={hf[key]!r} is not supported (GPT-2 has {allowed[0]!r})")
    n_head = hf.get("n_head", _GPT2_HEADS.get(n_embd))
    if n_head is None:
        raise ValueError(f"gpt2:{path}: n_head is not in the tensors' shapes and there is no config.json giving it "
                         f"(width {n_embd} is none of GPT-2's sizes {sorted(_GPT2_HEADS)})")
    if n_embd % n_head:
        raise ValueError(f"gpt2:{path}: width {n_embd} is not a multiple of n_head {n_head}")
    return GPTConfig(vocab_size=vocab, block_size=tensors["wpe.weight"].shape[0], n_layer=n_layer,
                     n_head=n_head, n_embd=n_embd, dropout=dropout)


def _gpt2_state_dict(tensors: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """Hugging Face's names and layouts turned into this model's state dict (float32)."""
    state = {}
    for key, tensor in tensors.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        if key == "lm_head.weight":  # GPT-2 ties it to wte; a different tensor is another model
            if not torch.equal(tensor, tensors["wte.weight"]):
                raise ValueError(f"{source}: lm_head.weight differs from wte.weight; only tied GPT-2 is supported")
            continue
        tensor = tensor.float()
        state["transformer." + key] = tensor.t().contiguous() if key.endswith(_CONV1D) else tensor.contiguous()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:config.block_size].clone()
    return state


def _check_names_and_shapes(state: dict[str, torch.Tensor], model: GPT, source: str) -> None:
    """A clear error for a missing, unexpected or misshapen tensor (load_state_dict's is a wall of text)."""
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
