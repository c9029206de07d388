"""Pictures of a training run: loss_curves.png from the trainer's history (or a metrics.csv), and TensorBoard.

    plot_history(trainer.history, "runs/x/loss_curves.png")
    plot_metrics_csv("runs/x/metrics.csv", "runs/x/loss_curves.png")     # or: python -m layoutgen.training.plots

The first panel holds the training loss and, where logged, the validation loss; every other logged number (loss
parts, validation metrics, the learning rate, throughput) gets a panel of its own, against the optimizer step. A
panel whose positive values span more than a factor of 20 uses a log y-axis, so the early drop does not flatten the
rest. Figures are built with matplotlib.figure.Figure and the Agg canvas directly: no pyplot, so no global figure
state survives a call, and no display is needed.
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from layoutgen.utils.atomic import atomic_write_bytes

__all__ = ["TensorBoardLog", "loss_figure", "panel_layout", "plot_history", "plot_metrics_csv", "read_metrics_csv",
           "require_tensorboard"]

# Columns that are axes or bookkeeping, not curves.
_NOT_CURVES = ("step", "epoch")
PANEL_SIZE = (4.0, 3.0)   # inches per panel
DPI = 100
COLUMNS = 3               # panels per row
LOG_RATIO = 20.0          # max/min above which a panel's y-axis is logarithmic
PLOT_INTERVAL_S = 30.0    # the Trainer redraws loss_curves.png at an epoch end when its last drawing is older


def _number(value: Any) -> float | None:
    """A finite float, or None for blanks, text and NaN/inf (metrics.csv holds strings after a resume)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _curves(history: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """{key: (steps, values)} for every numeric key, "loss" and "val_loss" first, then in first-logged order."""
    curves: dict[str, tuple[list[float], list[float]]] = {"loss": ([], []), "val_loss": ([], [])}
    for i, row in enumerate(history):
        step = _number(row.get("step"))
        step = float(i) if step is None else step
        for key, value in row.items():
            number = _number(value)
            if key in _NOT_CURVES or number is None:
                continue
            xs, ys = curves.setdefault(key, ([], []))
            xs.append(step)
            ys.append(number)
    return {k: v for k, v in curves.items() if v[0]}


def panel_layout(history: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """(rows, columns) of panels that plot_history draws for `history` (the image is columns*400 x rows*300)."""
    keys = [k for k in _curves(history) if k not in ("loss", "val_loss")]
    panels = 1 + len(keys)
    columns = min(COLUMNS, panels)
    return math.ceil(panels / columns), columns


def _log_scale_fits(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and bool(positive) and max(positive) / min(positive) > LOG_RATIO


def loss_figure(history: Sequence[Mapping[str, Any]]) -> Any:
    """The matplotlib Figure (Agg canvas) of `history`: the loss panel first, then one panel per other value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = _curves(history)
    if not curves:
        raise ValueError(f"no numeric values to plot (the history has {len(history)} rows)")
    rows, columns = panel_layout(history)
    figure = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    main = axes[0]
    plotted: list[float] = []
    for key, style in (("loss", dict(linewidth=1.0)), ("val_loss", dict(marker="o", linewidth=1.5))):
        if key in curves:
            main.plot(*curves[key], label=key.replace("_", " "), **style)
            plotted += curves[key][1]
    main.set_title("loss")
    if len(plotted) > 0:
        main.legend(loc="upper right", fontsize="small")
        if _log_scale_fits(plotted):
            main.set_yscale("log")
    others = [k for k in curves if k not in ("loss", "val_loss")]
    for ax, key in zip(axes[1:], others):
        xs, ys = curves[key]
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, linewidth=1.0)
        ax.set_title(key)
        if key != "lr" and _log_scale_fits(ys):
            ax.set_yscale("log")
    for ax in axes[:1 + len(others)]:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    for ax in axes[1 + len(others):]:
        ax.set_visible(False)
    figure.tight_layout()
    return figure


def plot_history(history: Sequence[Mapping[str, Any]], path_png: str | os.PathLike) -> str:
    """Draws `history` (rows of {"step", "loss", "val_loss", ...}) to a PNG, written atomically; returns its path."""
    try:
        figure = loss_figure(history)
    except ValueError as err:
        raise ValueError(f"{os.fspath(path_png)}: {err}") from None
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path_png, buffer.getvalue())
    return os.fspath(path_png)


def read_metrics_csv(path_csv: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a metrics.csv, blank cells left out."""
    path = os.fspath(path_csv)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file not found: {path}")
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k is not None and v not in ("", None)} for row in csv.DictReader(fh)]


def plot_metrics_csv(path_csv: str | os.PathLike, path_png: str | os.PathLike) -> str:
    """plot_history over the rows of a metrics.csv (as the Trainer writes it); returns the PNG's path."""
    rows = read_metrics_csv(path_csv)
    if not rows:
        raise ValueError(f"{os.fspath(path_csv)}: no rows to plot")
    return plot_history(rows, path_png)


def require_tensorboard() -> Any:
    """torch.utils.tensorboard.SummaryWriter, or a ValueError naming the option and the install command."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:   # torch raises ImportError when the tensorboard package is missing
        raise ValueError(f"training.tensorboard: needs the tensorboard package (pip install tensorboard); "
                         f"{' '.join(str(err).split())}") from None
    return SummaryWriter


class TensorBoardLog:
    """Scalars and images to out_dir/tensorboard through torch.utils.tensorboard (rank 0 only: the caller's job).

    Opening it checks that the tensorboard package is there, so a missing install fails at start-up, not at the end
    of the first epoch. `purge_step` (the step a resumed run continues from) drops the events a crashed run wrote
    after its last checkpoint, so the curves do not fold back on themselves.
    """

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir = log_dir
        self.writer = require_tensorboard()(log_dir=log_dir, purge_step=purge_step)

    def log_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Every numeric value of each history row as a scalar at the row's step ("val_x" under "val/x")."""
        for row in rows:
            step = _number(row.get("step"))
            if step is None:
                continue
            for key, value in row.items():
                number = _number(value)
                if key in _NOT_CURVES or number is None:
                    continue
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self.writer.add_scalar(tag, number, int(step))

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """[H, W, 3] uint8."""
        self.writer.add_image(tag, image, int(step), dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        print("usage: python -m layoutgen.training.plots METRICS.csv [OUT.png]   (default: loss_curves.png beside "
              "the csv)", file=sys.stderr)
        return 2
    out = args[1] if len(args) == 2 else os.path.join(os.path.dirname(os.path.abspath(args[0])), "loss_curves.png")
    try:
        print(plot_metrics_csv(args[0], out))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
