"""`lookaheadkv demo`: questions about a ~3,000-token essay prompt with planted facts, answered under the
full cache and under every method at one small budget, from one shared prefill per question."""

from __future__ import annotations

import time

import click
import torch

from . import data
from .decode import Sampling, decode
from .generate import build_prompt, evict, tokenize
from .methods import METHODS, get_method
from .models import load_model
from .prefill import prefill

# Planted facts with long exact answers: the case where the question's attention finds where the fact
# starts but the answer's own attention must walk along it (see ../shared/paper.md, "Observed here").
FACTS = [
    ("The access code for the archive room is 482913.",
     "What is the access code for the archive room?", "482913"),
    ("The password for the staff wifi network is BLUE-TIGER-42.",
     "What is the password for the staff wifi network?", "BLUE-TIGER-42"),
]
TARGET_CHARS = 12_000  # about 3,000 SmolLM2 tokens of essay text


def document(fact: str, depth: float = 0.4) -> str:
    """Test-split essays in name order, cut to ~3,000 tokens at a paragraph, with `fact` at `depth`."""
    text = "\n\n".join(data.essays("test").values())[:TARGET_CHARS]
    text = text[: text.rfind("\n") if "\n" in text else len(text)]
    cut = text.find("\n", int(len(text) * depth))
    cut = len(text) if cut < 0 else cut
    return f"{text[:cut]}\n{fact}\n{text[cut:]}"


def run_demo(model_name: str, budget: int, methods: list[str] | None, device: str) -> list[dict]:
    model, tok = load_model(model_name, device=device)
    names = methods or [n for n in METHODS if n != "speckv"]  # speckv needs a separate draft model
    chosen = [get_method(n) for n in names]
    rows = []
    for fact, question, expected in FACTS:
        prompt = build_prompt(tok, document(fact), question)
        enc = tokenize(model, tok, [prompt], max_new_tokens=32)
        ids = enc["input_ids"].to(device)
        t0 = time.perf_counter()
        shared = prefill(model, ids, record_rows=[r for m in chosen for r in m.recorded()])
        prefill_s = time.perf_counter() - t0
        click.echo(f"\nQ: {question}  (prompt {ids.shape[1]} tokens, shared prefill {prefill_s:.1f}s, "
                   f"budget {budget})")
        click.echo(f"{'method':<13} {'ok':<3} {'KV kept':>16} {'evict s':>8} {'decode s':>9}  answer")
        for m in chosen:
            pf = shared.clone()
            ev = evict(model, pf, m, budget)
            t1 = time.perf_counter()
            out = decode(model, pf, ev.key_valid, {tok.eos_token_id}, Sampling(max_new_tokens=32))[0]
            decode_s = time.perf_counter() - t1
            answer = tok.decode(out, skip_special_tokens=True).strip().replace("\n", " ")
            ok = expected.lower() in answer.lower()
            share = ev.kv_bytes_kept / ev.kv_bytes_full
            kept = f"{ev.kv_bytes_kept / 2**20:.1f}MiB {share:6.1%}"
            click.echo(f"{m.name:<13} {'yes' if ok else 'no':<3} {kept:>16} {ev.seconds:8.2f} {decode_s:9.2f}  "
                       f"{answer[:70]}")
            rows.append({"question": question, "method": m.name, "budget": ev.budget, "answer": answer,
                         "correct": ok, "kv_bytes_kept": ev.kv_bytes_kept, "kv_bytes_full": ev.kv_bytes_full})
            del pf
        del shared
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows
