"""Last stage: decode from an (evicted) cache at the original positions; greedy or sampled."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import forward_state
from .prefill import Prefill, forward


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


def next_token(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / s.temperature).softmax(dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= s.top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


@torch.no_grad()
def decode(model, pf: Prefill, key_valid: list[torch.Tensor] | None, eos_ids: set[int], s: Sampling
           ) -> list[list[int]]:
    """Generate up to s.max_new_tokens per sequence; each stops at its first EOS (not returned)."""
    gen = torch.Generator().manual_seed(s.seed) if s.temperature > 0 else None
    batch = pf.input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    positions = pf.lengths.clone()
    token = next_token(pf.next_logits, s, gen)
    for step in range(s.max_new_tokens):
        for i, t in enumerate(token.tolist()):
            if not done[i]:
                if t in eos_ids:
                    done[i] = True
                else:
                    out[i].append(t)
        if all(done) or step == s.max_new_tokens - 1:
            break
        with forward_state(key_valid=key_valid):
            logits = forward(model, pf.cache, positions[:, None], input_ids=token[:, None])
        positions += 1
        token = next_token(logits[:, -1], s, gen)
    return out
