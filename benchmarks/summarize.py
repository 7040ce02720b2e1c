"""Summarise a pytest-benchmark JSON as ratios against eager within the same run.

    python benchmarks/summarize.py results.json [--markdown OUT.md]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def summarize(data: dict) -> str:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        name = bench["name"].split("[")[0]
        method = bench["param"] if bench.get("param") else bench["name"]
        groups[f"{bench['fullname'].split('::')[0]}::{name}"][method] = bench
    lines = []
    for group, methods in groups.items():
        base = methods.get("eager") or next(iter(methods.values()))
        base_median = base["stats"]["median"]
        lines.append(f"\n{group}  (ratios vs {base['param'] or base['name']})")
        lines.append("| method | median ms | speedup | img/s | peak MiB | peak ratio | GFLOP | FLOP ratio |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for method, b in methods.items():
            med, info, binfo = b["stats"]["median"], b.get("extra_info", {}), base.get("extra_info", {})
            peak, bpeak = info.get("peak_memory_bytes"), binfo.get("peak_memory_bytes")
            flops, bflops = info.get("train_flops") or info.get("flops"), binfo.get("train_flops") or binfo.get("flops")
            img_s = info.get("img_per_s")  # op microbenchmarks have none
            lines.append(
                f"| {method} | {med * 1e3:.2f} | {base_median / med:.2f} | "
                f"{'-' if img_s is None else f'{img_s:.1f}'} | "
                f"{'-' if peak is None else f'{peak / 2**20:.0f}'} | "
                f"{'-' if not (peak and bpeak) else f'{peak / bpeak:.2f}'} | "
                f"{'-' if flops is None else f'{flops / 1e9:.1f}'} | "
                f"{'-' if not (flops and bflops) else f'{flops / bflops:.3f}'} |")
    env = data["benchmarks"][0].get("extra_info", {}) if data["benchmarks"] else {}
    header = ", ".join(f"{k} {env[k]}" for k in ("device", "torch", "triton", "cuda", "timm") if k in env)
    return f"{header}\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    with open(args.json) as f:
        text = summarize(json.load(f))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
