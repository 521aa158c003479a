"""The network: a GPT-2-style decoder-only transformer and greedy generation with a KV cache.

Pre-LayerNorm blocks, learned positions, causal attention through `scaled_dot_product_attention`, input and
output embeddings tied. Parameter names follow GPT-2 (transformer.wte, transformer.h.0.attn.c_attn, ...) so that
GPT-2's weights load by name (`python gpt2.py import` converts a Hugging Face folder). `forward` returns the
final hidden states, not logits: the loss (sftkey.py) projects only the positions that carry a loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 320
    block_size: int = 256  # longest sequence the position table covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in its linear layers and LayerNorms


class KVCache:
    """Keys and values of the positions seen so far, one slot per layer, preallocated."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int):
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = self.v = None  # allocated at the first update, in the dtype autocast gives k and v
        self.length = 0  # positions already stored; advanced by GPT.forward after all layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = (torch.zeros(self.shape, device=k.device, dtype=k.dtype) for _ in range(2))
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end], self.v[layer, :, :, self.length:end] = k, v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_head {config.n_head} does not divide n_embd {config.n_embd}"
        self.layer, self.n_head, self.dropout = layer, config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return F.dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)), self.dropout, self.training)  # GPT-2's resid


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections scaled down with depth (GPT-2)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: float, projected_fraction: float = 1.0) -> float:
        """Matmul FLOPs of one training step (forward + backward) per input position.

        FLOPs/token = 6 * N  +  12 * n_layer * n_embd * seq_len  +  6 * n_embd * vocab * projected_fraction
          - N: weights of the linear layers inside the blocks (12 * n_embd^2 per layer); each does a
            multiply-add per token in the forward (2N) and twice that in the backward (4N).
          - attention: q.k and attn.v cost 2 * n_embd * seq_len each per token and layer in the forward,
            times 3 with the backward; counted over the full square, causal masking not discounted.
          - vocabulary projection: only the projected share of positions pays for it (all of them
            in the plain way; those with a loss weight in sftkey.weighted_loss_sum).
        LayerNorm, GELU, softmax, biases, embedding lookups and the optimizer are left out: they
        are O(n_embd) per token, small next to the matmuls.
        """
        c = self.config
        n = sum(m.weight.numel() for m in self.transformer.h.modules() if isinstance(m, nn.Linear))
        return 6 * n + 12 * c.n_layer * c.n_embd * seq_len + 6 * c.n_embd * c.vocab_size * projected_fraction

    def forward(self, idx: torch.Tensor, pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states (B, T, n_embd) after the final LayerNorm. Training passes `idx` alone (positions 0..T-1, a
        plain causal mask); generation each row's positions, a boolean attention mask (B, 1, T, S) and the cache."""
        T = idx.size(1)
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, mask, cache)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    def configure_optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float],
                            device_type: str) -> torch.optim.AdamW:
        """AdamW with decay on matrices and embeddings only (not on biases and LayerNorm gains)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # The fused kernel (CUDA, and CPU from PyTorch 2.4) is several times faster than the per-tensor loop.
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_token: int,
                 use_cache: bool = True, allowed: torch.Tensor | None = None) -> list[list[int]]:
        """Greedy continuation of a batch of prompts of any lengths, until `stop_token` (included) or the limit.

        Prompts are left-padded; each row's positions start at 0 at its first real token and an attention mask
        hides the padding, so a row's tokens do not depend on the rest of the batch. Each row's own limit:
        `max_new_tokens`, and block_size + 1 tokens in all with its prompt (the last is predicted from position
        block_size - 1, never fed back: the longest example training keeps). `use_cache=False` re-runs the whole
        prefix at every step (the slow reference of the tests and bench.py). `allowed`, a bool mask over the
        vocabulary (`data.generable_ids`), limits the choice to ids the tokenizer can decode: not the embedding's
        padding rows (the table is a multiple of 64), not gaps in its ids."""
        if self.training and self.config.dropout:  # each token would be read by another thinned network
            raise RuntimeError("generate with dropout on: call model.eval() first")
        device, B, block = self.transformer.wte.weight.device, len(prompts), self.config.block_size
        width = max(map(len, prompts), default=0)
        if not (prompts and all(prompts)) or width > block:  # an empty prompt has no position to predict from
            raise ValueError(f"generate needs prompts of 1 to block_size {block} tokens; got {len(prompts)}, of "
                             f"{min(map(len, prompts), default=0)} to {width}")
        budget = torch.tensor([max(0, min(max_new_tokens, block + 1 - len(p))) for p in prompts], device=device)
        total = width + int(budget.max())
        idx = torch.tensor([[0] * (width - len(p)) + list(p) + [0] * (total - width) for p in prompts], device=device)
        real = torch.arange(total, device=device) >= idx.new_tensor([width - len(p) for p in prompts])[:, None]
        # A row past its budget runs on (its tokens are cut below) at the last position the table has.
        pos = (real.cumsum(1) - 1).clamp(0, block - 1)
        # Query i sees key j when j <= i and j is a real token; every position also sees itself, so
        # the padding rows have something to attend to (an all-masked row would give NaN).
        causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
        mask = ((causal & real[:, None, :]) | torch.eye(total, dtype=torch.bool, device=device))[:, None]
        cache = KVCache(self.config, B, total) if use_cache else None
        done = budget < 1
        start, end = 0, width  # fed this step: the whole prompt at first, then only the newest token
        while end < total and not done.all():
            h = self(idx[:, start:end], pos[:, start:end], mask[:, :, start:end, :end], cache)
            # lm_head's product written as W @ h.T: the same product, but CPU BLAS streams the large
            # (vocab, C) matrix 2-3x faster in this order when only a few rows are projected.
            logits = (self.lm_head.weight @ h[:, -1].T).T
            if allowed is not None:  # -inf: an id outside the mask is never the argmax
                logits = logits.masked_fill(~allowed, float("-inf"))
            nxt = logits.argmax(-1)
            idx[:, end] = nxt
            done |= (nxt == stop_token) | (budget <= end + 1 - width)
            start, end = (end if use_cache else 0), end + 1
        # Rows that stopped early went on: cut each at its budget, then at its stop token.
        rows = [row[:n] for row, n in zip(idx[:, width:end].tolist(), budget.tolist())]
        return [row[:row.index(stop_token) + 1] if stop_token in row else row for row in rows]
