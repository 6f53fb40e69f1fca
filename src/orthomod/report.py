"""Turn run folders into figures and a comparison table (``orthomod report``).

Everything is derived from the files a run writes (config.json, summary.json, metrics.jsonl,
diagnostics.jsonl, and for Fig. 6 its checkpoint), so any run can be re-reported later, and a
run that was interrupted or diverged reports what it has.

Figures (PNG, matplotlib Agg): training loss and test accuracy curves; mean filter correlation
against iterations (paper Fig. 2); first/last error moment ratio on a log scale (Fig. 3); a
heatmap of per-layer ratios ``q^l / q^L``, layers x iterations, per run (Fig. 4); first-layer
filters and feature maps of a fixed test image, per run (Fig. 6). ``report.md`` and
``report.html`` show the same table and figures. :func:`propagation_figure` draws what
``orthomod analyze propagation`` measures, for one net or several.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OrthomodError
from .files import RunFolder

__all__ = ["Run", "load_run", "write_report", "propagation_figure", "ReportError"]


class ReportError(OrthomodError):
    """A folder given to the report is not a run folder."""


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict | None
    metrics: list[dict] = field(default_factory=list)
    diagnostics: list[dict] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        if self.summary is None:
            return "no summary yet"
        if self.summary.get("status") == "diverged":
            return f"diverged at step {self.summary.get('diverged_at_step')}"
        return self.summary.get("status", "?")


def load_run(path: str | Path) -> Run:
    folder = RunFolder(path)
    if not folder.is_run():
        raise ReportError(f"{folder.path} is not a run folder (no config.json)")
    diagnostics = folder.records("diagnostics.jsonl")
    names = next((r["names"] for r in diagnostics if r.get("kind") == "layers"), [])
    return Run(folder.path, folder.config(), folder.summary(), folder.records("metrics.jsonl"),
               [r for r in diagnostics if r.get("kind") == "diagnostics"], names)


# -- figures ------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(i: int) -> dict:
    """Line style of the i-th run: the ten default colours, then the same with another dash."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}


def _legend(ax, count: int) -> None:
    """The runs' legend: inside the axes for a few runs, beside them (outside) for many, where it
    would cover the lines; a column per 25 runs."""
    if count <= 8:
        ax.legend(fontsize=7)
    else:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  ncol=1 + (count - 1) // 25)


def _curves(runs: list[Run], out: Path) -> str:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(runs):
        train = [r for r in run.metrics if r["kind"] == "train"]
        evals = [r for r in run.metrics if r["kind"] == "eval"]
        left.plot([r["step"] for r in train], [r["loss"] for r in train], label=run.label, **_style(i))
        right.plot([r["step"] for r in evals], [100 * r["test_acc"] for r in evals], marker=".", label=run.label,
                   **_style(i))
    left.set(xlabel="iteration", ylabel="training loss", title="Training loss")
    right.set(xlabel="iteration", ylabel="test accuracy (%)", title="Test accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    _legend(right, len(runs))
    return _save(fig, out / "curves.png")


def _series(runs: list[Run], key: str, out: Path, name: str, ylabel: str, title: str, log: bool) -> str | None:
    plotted = [r for r in runs if r.diagnostics]
    if not plotted:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(plotted):
        points = [(r["step"], r[key]) for r in run.diagnostics
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and (r[key] > 0 or not log)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=run.label, **_style(i))
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="iteration", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(plotted))
    return _save(fig, out / name)


def _heatmap(run: Run, out: Path) -> str | None:
    rows = [r for r in run.diagnostics if r.get("error_moments_after")]
    if not rows:
        return None
    import numpy as np

    plt = _pyplot()
    ratios = []
    for r in rows:
        moments = np.array([m if isinstance(m, (int, float)) else np.nan for m in r["error_moments_after"]], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append(np.log10(moments / moments[-1]))
    grid = np.array(ratios).T  # layers x iterations
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    left, right = (steps[0], steps[-1]) if steps[-1] > steps[0] else (steps[0] - 0.5, steps[0] + 0.5)  # one probe
    image = ax.imshow(grid, aspect="auto", origin="lower", cmap="coolwarm",
                      extent=(left, right, 0.5, grid.shape[0] + 0.5),
                      vmin=-max(1.0, np.nanmax(np.abs(grid))), vmax=max(1.0, np.nanmax(np.abs(grid))))
    fig.colorbar(image, ax=ax, label="log10 q^l / q^L")
    ax.set(xlabel="iteration", ylabel="conv layer (1 = first)", title=f"Per-layer error moment ratio: {run.label}")
    return _save(fig, out / f"layer_ratios_{run.label}.png")


def _first_layer(run: Run, out: Path, image_cache: dict) -> tuple[str | None, str]:
    """Fig. 6: the first conv's filters and its Conv-BN-ReLU maps of the first test image."""
    checkpoint = next((run.path / n for n in ("checkpoint.pt", "best.pt") if (run.path / n).exists()), None)
    if checkpoint is None:
        return None, "no checkpoint"
    import torch

    from .config import TrainConfig
    from .data import DataError, make_loaders
    from .files import CheckpointError
    from .models import ConvBNReLU
    from .train import build_model

    try:
        state = RunFolder(run.path).load_checkpoint(checkpoint.name)
    except CheckpointError as exc:
        return None, str(exc)
    config = TrainConfig.from_dict(run.config).replace(eval_batch_size=1, workers=0, channels_last=False)
    key = json.dumps({k: v for k, v in config.to_dict().items()
                      if k in ("dataset", "data", "shapes_train", "shapes_test", "shapes_seed", "normalize",
                               "val_split", "image_size", "resize")}, sort_keys=True)
    if key not in image_cache:
        try:
            _, test, classes = make_loaders(config, torch.device("cpu"))
            image_cache[key] = ((next(iter(test.epoch()))[0], len(classes)), "")
        except DataError as exc:
            image_cache[key] = (None, str(exc))
    image, reason = image_cache[key]
    model = build_model(config, image[1] if image else None)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        return None, f"checkpoint does not match the model ({str(exc).splitlines()[0]})"
    model.eval()
    plt = _pyplot()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    filters = first_conv.weight.detach()
    columns = min(filters.shape[0], 16)
    rows = 2 if image is None else 3
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.8, rows * 0.9 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(columns):
        axes[0, i].imshow(_unit(filters[i]).permute(1, 2, 0).numpy(), interpolation="nearest")
    if image is not None:
        x = image[0]
        captured = []
        # the first Conv-BN-activation triple's activation, whichever the run used
        first_relu = next((m[2] for m in model.modules() if isinstance(m, ConvBNReLU)), None) or next(
            m for m in model.modules() if isinstance(m, torch.nn.ReLU))  # the ImageNet layouts
        handle = first_relu.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
        with torch.no_grad():
            model(x)  # the first Conv-BN-ReLU triple's output is what the figure shows
        handle.remove()
        axes[1, 0].imshow(_unit(x[0]).permute(1, 2, 0).numpy())
        for i in range(columns):
            axes[2, i].imshow(captured[0][0, i].numpy(), cmap="gray")
    fig.suptitle(f"First layer: filters (top){'' if image is None else ', test image and feature maps'}: {run.label}",
                 fontsize=8)
    return _save(fig, out / f"first_layer_{run.label}.png"), reason


def propagation_figure(nets: dict[str, dict], path: str | Path) -> Path:
    """Two panels from :func:`orthomod.diagnostics.signal_propagation`'s results, one line per
    net (label -> result): each layer's output second moment over the first layer's (the signal
    going up) and each layer's error moment over the last layer's (``q^l / q^L``, the errors
    coming down), both on a log scale against the layer's position."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (up, down) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, result) in enumerate(nets.items()):
        layers = range(1, len(result["forward"]) + 1)
        first, last = result["forward"][0], result["errors"][-1]
        up.plot(layers, [v / first if first else math.nan for v in result["forward"]], label=label, **_style(i))
        down.plot(layers, [v / last if last else math.nan for v in result["errors"]], label=label, **_style(i))
    up.set(xlabel="layer (forward order)", ylabel="E[out^2] / first layer's", title="Signal at step 0, going up")
    down.set(xlabel="layer (forward order)", ylabel="q^l / q^L", title="Errors at step 0, coming down")
    for ax in (up, down):
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    _legend(down, len(nets))
    path = Path(path)
    _save(fig, path)
    return path


def _unit(t):
    """Rescale a tensor to [0, 1] for display."""
    return (t - t.min()) / (t.max() - t.min() + 1e-12)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": a legend beside the axes is kept whole
    _pyplot().close(fig)
    return path.name


# -- table -------------------------------------------------------------------------------------
_COLUMNS = ("run", "model", "init", "reg", "modulation", "optimizer", "lr", "seed", "steps", "status",
            "final test acc", "best test acc", "final train loss", "wall time")


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def table_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        c, s = run.config, run.summary or {}
        modulation = "off"
        if c.get("modulation"):
            until = c.get("modulation_until")
            modulation = f"{c.get('modulation_rule')} tau={c.get('modulation_tau'):g} until={'always' if until is None else until}"
        lr = c.get("lr") if c.get("lr") is not None else (s.get("settings", {}).get("lr"))
        loss = s.get("final_train_loss")
        rows.append([
            run.label, c["model"], c["init"], c["reg"] + (f" {c['reg_coeff']:g}" if c["reg"] != "none" else "")
            + (f" + l2 {c['l2_beside']:g}" if c.get("l2_beside") else ""),
            modulation, c["optimizer"], "-" if lr is None else f"{lr:g}", str(c["seed"]),
            f"{s.get('step', '-')}/{s.get('total_steps', '-')}", run.status,
            _percent(s.get("final_test_acc")), _percent(s.get("best_test_acc")),
            "-" if loss is None else f"{loss:.4f}",
            "-" if s.get("wall_time_s") is None else f"{s['wall_time_s'] / 60:.1f} min",
        ])
    return rows


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write figures, ``report.md`` and ``report.html`` for ``run_dirs`` into ``out``."""
    runs = [load_run(p) for p in run_dirs]
    if not runs:
        raise ReportError("give at least one run folder")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise ReportError(f"run folder names must differ (they label the figures): {labels}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str | None, str]] = [("Training loss and test accuracy", _curves(runs, out), "")]
    figures.append(("Mean filter correlation (paper Fig. 2)", _series(
        runs, "filter_correlation_mean", out, "filter_correlation.png", "mean |cos| between filters",
        "Filter correlation", log=True), "no diagnostics recorded"))
    figures.append(("First/last conv error moment ratio (paper Fig. 3)", _series(
        runs, "moment_ratio_first_last", out, "moment_ratio.png", "q(first conv) / q(last conv)",
        "Error magnitude ratio", log=True), "no diagnostics recorded"))
    for run in runs:
        figures.append((f"Per-layer ratios q^l / q^L: {run.label} (paper Fig. 4)", _heatmap(run, out),
                        "no diagnostics recorded"))
    cache: dict = {}
    for run in runs:
        name, reason = _first_layer(run, out, cache)
        figures.append((f"First layer: {run.label} (paper Fig. 6)", name, reason))
    rows = table_rows(runs)
    (out / "report.md").write_text(_markdown(rows, figures))
    (out / "report.html").write_text(_html(rows, figures))
    return out


def _markdown(rows: list[list[str]], figures) -> str:
    lines = ["# orthomod report", "", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for title, name, reason in figures:
        lines += ["", f"## {title}", ""]
        lines.append(f"![{title}]({name})" if name else f"(not drawn: {reason})")
    return "\n".join(lines) + "\n"


def _html(rows: list[list[str]], figures) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in _COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in rows)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>orthomod report</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style></head><body>",
             "<h1>orthomod report</h1>", f"<table><tr>{head}</tr>{body}</table>"]
    for title, name, reason in figures:
        parts.append(f"<h2>{esc(title)}</h2>")
        parts.append(f"<img src='{esc(name)}' alt='{esc(title)}'>" if name else f"<p>(not drawn: {esc(reason)})</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
