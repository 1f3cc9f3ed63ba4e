"""Speed and memory benchmarks: time to first token split into stages, eviction overhead, decode throughput,
KV-cache bytes, peak memory and the largest batch that fits (see docs/bench.md).

    lookaheadkv bench --model llama-3.1-8b --device cuda --contexts 8192,16384,32768 --out results/bench/x
"""

from .runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
