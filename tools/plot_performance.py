"""Plot decode ms/token against the HBM roofline from `bench.py generate` JSON files.

    python tools/plot_performance.py docs/bench/generate_{e2b,e4b,26b-a4b,31b}_h200.json -o docs/performance.png

One panel per batch size found in the files: for each variant, our decode ms/token, the roofline (bytes a
step must read ÷ the measured bandwidth, as the bench computed it) and transformers' figures where the same
file has them (eager; static cache + torch.compile). Needs matplotlib (not a dependency of the package).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def load(paths: list[str]) -> list[dict]:
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def series(runs: list[dict], batch: str) -> dict[str, list]:
    """{label: [ms/token per run, None where not measured]} for one batch size."""
    out: dict[str, list] = {"ours": [], "roofline": [], "transformers eager": [], "transformers static+compile": []}
    for run in runs:
        ours = run.get("results", {}).get(batch, {})
        out["ours"].append(ours.get("decode_ms_per_token"))
        out["roofline"].append(ours.get("roofline_ms_per_token"))
        hf = run.get("transformers", {}).get(batch, {})
        out["transformers eager"].append(hf.get("eager", {}).get("decode_ms_per_token"))
        out["transformers static+compile"].append(hf.get("static_compiled", {}).get("decode_ms_per_token"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_performance needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 1
    runs = load(args.json)
    batches = sorted({b for r in runs for b in r.get("results", {})}, key=int)
    names = [r["preset"] for r in runs]
    card = runs[0].get("card", "?")
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.2), squeeze=False)
    styles = {"ours": dict(color="tab:blue"), "roofline": dict(color="black", alpha=0.35),
              "transformers eager": dict(color="tab:red", alpha=0.6),
              "transformers static+compile": dict(color="tab:orange")}
    width = 0.2
    for ax, batch in zip(axes[0], batches, strict=True):
        data = series(runs, batch)
        for k, (label, values) in enumerate(data.items()):
            xs = [i + (k - 1.5) * width for i in range(len(names))]
            ax.bar([x for x, v in zip(xs, values, strict=True) if v is not None],
                   [v for v in values if v is not None], width, label=label, **styles[label])
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names)
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("decode ms per step (log)")
        ax.grid(axis="y", alpha=0.3, which="both")
    full = max(range(len(batches)), key=lambda i: sum(v is not None for vs in series(runs, batches[i]).values()
                                                        for v in vs))
    axes[0][full].legend(fontsize=8)  # on the panel that has every series
    fig.suptitle(f"Decode step time vs the HBM roofline, bf16, prompt {runs[0].get('prompt_len')} "
                 f"+ {runs[0].get('gen_len')} new tokens ({card}, {runs[0].get('date')})")
    fig.tight_layout()
    tmp = args.output + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
