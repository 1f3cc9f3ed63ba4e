"""`lookaheadkv bench`: the command line of the benchmark (registered on the main group in cli.py; also
`python -m lookaheadkv.bench`, which needs none of the other commands' modules)."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ..errors import LookaheadKVError
from .report import markdown
from .runner import BenchConfig, run_bench


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LookaheadKVError(f"{what} must be comma-separated integers, got {text!r}") from None


@click.command("bench")
@click.option("--model", default="llama-3.1-8b", show_default=True,
              help="a model shape (random weights: llama-3.1-8b, qwen3-8b, llama-3.2-1b, tiny) or a named model")
@click.option("--random-weights", is_flag=True, help="a named model's shape with random weights")
@click.option("--device", default="cpu", show_default=True)
@click.option("--device-map", help="spread the model over several devices with accelerate: auto (every visible GPU), "
              "balanced, sequential, or a JSON file {module: device}; replaces --device")
@click.option("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
@click.option("--contexts", default="8192,16384,32768", show_default=True, help="prompt lengths in tokens")
@click.option("--methods", default="full,snapkv,pyramidkv,lookahead,laq:k=8,speckv:k=32", show_default=True,
              help="comma-separated; options as name:key=value")
@click.option("--budget", default=1024, show_default=True, help="entries kept per layer and KV head (TTFT runs)")
@click.option("--decode-context", type=int, default=None, help="prompt length for decode runs (default: largest)")
@click.option("--decode-budgets", default="256,1024", show_default=True)
@click.option("--decode-batches", default="1,8,16", show_default=True, help="empty: no decode runs")
@click.option("--decode-methods", default="snapkv,pyramidkv,lookahead", show_default=True)
@click.option("--decode-steps", default=16, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--warmup", default=1, show_default=True)
@click.option("--memory-gib", type=float, default=None, help="memory to fit batches into (default: the device's)")
@click.option("--draft-model", default="llama-3.2-1b", show_default=True, help="SpecKV's draft (shape or name)")
@click.option("--split-extra-rows/--no-split-extra-rows", default=True, show_default=True,
              help="also time single-pass lookahead's rows without their adapter and with it on those rows only")
@click.option("--plain/--no-plain", default=True, show_default=True,
              help="also time plain transformers' prefill (its sdpa, torch's backend choice) in the rotation")
@click.option("--fresh-lengths/--repeat-lengths", default=True, show_default=True,
              help="every TTFT call at a prompt length new to the run, a few tokens below the context")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
def bench(model, random_weights, device, device_map, dtype, contexts, methods, budget, decode_context, decode_budgets,
          decode_batches, decode_methods, decode_steps, repeats, warmup, memory_gib, draft_model, split_extra_rows,
          plain, fresh_lengths, out):
    """Time to first token by stage, eviction overhead, decode speed, KV bytes and memory (docs/bench.md)."""
    gpu = device.startswith("cuda") or (device_map is not None and torch.cuda.is_available())
    cfg = BenchConfig(model=model, random_weights=random_weights, device=device, device_map=device_map,
                      dtype=dtype or ("bfloat16" if gpu else "float32"),
                      contexts=_ints(contexts, "--contexts"), methods=[m for m in methods.split(",") if m],
                      budget=budget, decode_context=decode_context,
                      decode_budgets=_ints(decode_budgets, "--decode-budgets"),
                      decode_batches=_ints(decode_batches, "--decode-batches"),
                      decode_methods=[m for m in decode_methods.split(",") if m], decode_steps=decode_steps,
                      repeats=repeats, warmup=warmup, memory_gib=memory_gib, draft_model=draft_model,
                      split_extra_rows=split_extra_rows, plain=plain, fresh_lengths=fresh_lengths)
    if repeats < 1 or not cfg.contexts:
        raise LookaheadKVError("--repeats must be >= 1 and --contexts must name at least one length")
    click.echo(markdown(run_bench(cfg, out)))
