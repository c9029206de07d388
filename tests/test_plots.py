"""loss_curves.png from a trainer history or a metrics.csv: panels, log scale, errors, and the standalone entry."""
import pytest
from PIL import Image

from layoutgen.training.autoencoder import write_history
from layoutgen.training.plots import (loss_figure, main, panel_layout, plot_history, plot_metrics_csv,
                                      read_metrics_csv)


def history(start_loss: float = 10.0, end_loss: float = 0.01, steps: int = 30):
    """Train rows every step (loss, lr, one loss part) and a validation row every 10 steps, as the Trainer logs."""
    rows = []
    for step in range(1, steps + 1):
        loss = start_loss * (end_loss / start_loss) ** ((step - 1) / (steps - 1))
        rows.append({"step": step, "epoch": (step - 1) // 10, "loss": loss, "lr": 1e-3, "mse": loss / 2,
                     "samples_per_s": 100.0})
        if step % 10 == 0:
            rows.append({"step": step, "epoch": (step - 1) // 10, "val_loss": loss * 1.1})
    return rows


def test_panels_and_image_size(tmp_path):
    rows = history()
    # loss (+ val_loss) | lr | mse | samples_per_s: 4 panels, 3 per row
    assert panel_layout(rows) == (2, 3)
    path = plot_history(rows, tmp_path / "loss_curves.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (3 * 400, 2 * 300)
    assert not list(tmp_path.glob(".*.tmp"))   # written atomically: no temporary file left behind


def test_loss_panel_holds_train_and_val_and_goes_log_when_the_range_is_wide():
    figure = loss_figure(history(10.0, 0.01))
    main_axes = figure.axes[0]
    assert [line.get_label() for line in main_axes.get_lines()] == ["loss", "val loss"]
    assert main_axes.get_yscale() == "log"
    assert [ax.get_title() for ax in figure.axes if ax.get_visible()] == ["loss", "lr", "mse", "samples_per_s"]
    narrow = loss_figure(history(1.0, 0.5))
    assert narrow.axes[0].get_yscale() == "linear"


def test_metrics_csv_round_trip_and_resumed_strings(tmp_path):
    rows = history(steps=12)
    write_history(str(tmp_path / "metrics.csv"), rows)
    read = read_metrics_csv(tmp_path / "metrics.csv")
    assert len(read) == len(rows) and "val_loss" not in read[0]   # blank cells are left out
    path = plot_metrics_csv(tmp_path / "metrics.csv", tmp_path / "curves.png")
    with Image.open(path) as image:
        assert image.size == (3 * 400, 2 * 300)
    # the trainer's resumed history holds the csv's strings: they plot like numbers
    assert [ax.get_title() for ax in loss_figure(read).axes if ax.get_visible()][:2] == ["loss", "lr"]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        plot_metrics_csv(tmp_path / "nope.csv", tmp_path / "x.png")
    (tmp_path / "empty.csv").write_text("step,loss\n")
    with pytest.raises(ValueError, match="empty.csv"):
        plot_metrics_csv(tmp_path / "empty.csv", tmp_path / "x.png")
    with pytest.raises(ValueError, match="x.png"):
        plot_history([{"step": 1, "note": "text"}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_standalone_entry_point(tmp_path, capsys):
    write_history(str(tmp_path / "metrics.csv"), history(steps=5))
    assert main([str(tmp_path / "metrics.csv")]) == 0
    assert (tmp_path / "loss_curves.png").is_file()
    assert main([str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
