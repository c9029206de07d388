"""Writes a bench's results: JSON (machine + every row), CSV (every row, machine columns repeated), a markdown
table per suite (printed and saved) and PNG plots (matplotlib, Agg backend: no display needed).

Plots: speed-up over the reference per op and shape (one bar per provider), and each op's achieved GB/s against
the copy bandwidth measured in the same run (the dashed line).
"""
from __future__ import annotations

import csv
import json
import os

from layoutgen.bench.tables import markdown_table
from layoutgen.utils.atomic import atomic_write_text

OP_COLUMNS = ["op", "shape", "mode", "dtype", "provider", "ms", "GB/s", "% bw", "TFLOP/s", "samples/s",
              "vs reference", "vs compile", "path"]
MODEL_COLUMNS = ["op", "shape", "dtype", "provider", "ms", "samples/s", "peak MiB", "vs reference", "vs compile",
                 "path"]
MATRIX_COLUMNS = ["model", "mode", "ops", "dtype", "compile s", "ms", "samples/s", "vs eager", "graph breaks", "note"]


def header(machine: dict, command: str) -> str:
    bandwidth = machine.get("copy_bandwidth_gbs")
    lines = [f"card: {machine['card']}; torch {machine['torch']}, triton {machine['triton']}, "
             f"python {machine['python']}; commit {machine['commit']}",
             f"command: `{command}`"]
    if bandwidth is not None:
        lines.append(f"measured copy bandwidth: {bandwidth:.1f} GB/s ({machine['copy_bandwidth_method']})")
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    """The whole result as markdown: a header, then one table per suite present."""
    rows = result["rows"]
    parts = [f"# layoutgen bench ({result['mode']})", "", header(result["machine"], result["command"]), ""]
    ops = [r for r in rows if r.get("suite") == "ops"]
    models = [r for r in rows if r.get("suite") == "models"]
    matrix = [r for r in rows if r.get("suite") == "compile_matrix"]
    if ops:
        parts += ["## Ops", "", markdown_table(ops, OP_COLUMNS), ""]
    if models:
        memory = next((r["memory method"] for r in models if "memory method" in r), "")
        parts += ["## Models (one training step)", "", f"peak memory: {memory}", "",
                  markdown_table(models, MODEL_COLUMNS), ""]
    if matrix:
        parts += ["## torch.compile matrix", "", markdown_table(matrix, MATRIX_COLUMNS), ""]
    parts += [f"note: {note}" for note in result.get("notes", [])]
    parts += ["", "vs reference / vs compile / vs eager: speed-up over that provider, measured in this run (higher "
              "is faster). GB/s from analytic byte counts; % bw: share of the copy bandwidth above (on a CPU a small "
              "tensor stays in cache, so it can pass 100%)."]
    return "\n".join(parts) + "\n"


def write_csv(path: str, result: dict) -> None:
    rows = result["rows"]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    machine_columns = [k for k in result["machine"] if k not in columns]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns + machine_columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{k: result["machine"][k] for k in machine_columns}})
    os.replace(tmp, path)


def _label(row: dict) -> str:
    return f"{row['op']} {row.get('mode', '')}\n{row.get('shape', '')}".strip()


def plot_speedups(path: str, rows: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r.get("vs reference"), float)]
    groups = list(dict.fromkeys(_label(r) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) + 2), 4.5))
    for i, provider in enumerate(providers):
        values = {_label(r): r["vs reference"] for r in rows if r["provider"] == provider}
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [values.get(label, 0.0) for label in groups], width, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([g + width * (len(providers) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_ylabel("speed-up over the reference (x)")
    ax.set_title(title, fontsize=9)
    if providers:  # (nothing measured: an empty chart, still written so every run has the same files)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bandwidth(path: str, rows: list[dict], ceiling: float, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r.get("GB/s"), float)]
    labels = [f"{_label(r)}\n{r['provider']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2), 4.5))
    ax.bar(range(len(rows)), [r["GB/s"] for r in rows], color="tab:blue")
    ax.axhline(ceiling, color="tab:red", linestyle="--", label=f"measured copy bandwidth {ceiling:.1f} GB/s")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=6, rotation=90)
    ax.set_ylabel("achieved GB/s (analytic bytes)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: str, result: dict) -> dict[str, str]:
    """Writes every file; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = "compile_matrix" if result["mode"].startswith("compile matrix") else "bench"
    files = {"json": os.path.join(out_dir, f"{prefix}.json"), "csv": os.path.join(out_dir, f"{prefix}.csv"),
             "markdown": os.path.join(out_dir, f"{prefix}.md")}
    # allow_nan=False: a NaN would make the file unreadable to strict JSON parsers; unmeasured figures are None
    atomic_write_text(files["json"], json.dumps(result, indent=2, default=str, allow_nan=False) + "\n")
    write_csv(files["csv"], result)
    atomic_write_text(files["markdown"], markdown_report(result))
    card = result["machine"]["card"]
    ops = [r for r in result["rows"] if r.get("suite") == "ops"]
    models = [r for r in result["rows"] if r.get("suite") == "models"]
    # a compile-matrix cell as a bar: one group per model, ops and dtype, one bar per compile mode
    models += [{"op": r["model"], "mode": r["dtype"], "shape": f"{r['ops']} ops", "provider": r["mode"],
                "vs reference": r["vs eager"]} for r in result["rows"] if r.get("suite") == "compile_matrix"]
    if ops:
        files["speedup_png"] = os.path.join(out_dir, "ops_speedup.png")
        plot_speedups(files["speedup_png"], ops, f"ops: speed-up over the reference ({card})")
        files["bandwidth_png"] = os.path.join(out_dir, "ops_bandwidth.png")
        plot_bandwidth(files["bandwidth_png"], ops, result["machine"]["copy_bandwidth_gbs"],
                       f"ops: achieved bandwidth vs the measured ceiling ({card})")
    if models:
        files["models_png"] = os.path.join(out_dir, f"{prefix}_models_speedup.png")
        what = "over eager" if prefix == "compile_matrix" else "over the reference"
        plot_speedups(files["models_png"], models, f"models: speed-up {what} ({card})")
    return files
