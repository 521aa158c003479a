"""GPT-2's weights from a Hugging Face checkpoint folder (--init_from gpt2:DIR), in model.py's names; a reader of
SFTKey can skip it. No `transformers` needed: the tensors are read (safetensors, or a pytorch_model.bin with
weights_only=True), renamed, and GPT-2's Conv1D weights transposed into nn.Linear's layout."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from model import GPT, GPTConfig

_GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # n_embd -> n_head of GPT-2 small, medium, large, xl
# Hugging Face stores these as Conv1D, whose weight is (in, out): the transpose of nn.Linear's.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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


def _gpt2_config(tensors: dict[str, torch.Tensor], path: str, source: str, dropout: float,
                 block_size: int | None, n_vocab: int | None) -> GPTConfig:
    if missing := [name for name in ("wte.weight", "wpe.weight") if name not in tensors]:
        raise ValueError(f"{source}: no tensor {missing[0]}; is it a GPT-2 checkpoint?")
    vocab, n_embd = tensors["wte.weight"].shape
    if n_vocab is not None and vocab != n_vocab:
        raise ValueError(f"gpt2:{path}: a vocabulary of {vocab} tokens, but the gpt2 encoding has {n_vocab}")
    n_layer = len({k.split(".")[1] for k in tensors if k.startswith("h.")})
    config_file = os.path.join(path, "config.json")
    hf = json.loads(Path(config_file).read_text(encoding="utf-8")) if os.path.isfile(config_file) else {}
    # Variants whose arithmetic differs from GPT-2's would load and compute something else: refuse them by name.
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
        state["transformer." + key] = tensor.t().contiguous() if key.endswith(_CONV1D) else tensor.contiguous()
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

