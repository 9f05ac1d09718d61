"""Writers for an evaluation: results.json, results.md (one table) and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mend.io import atomic_write, write_json, write_text

TABLE_KEYS = ("efficacy", "generalization", "locality", "score", "neighborhood", "edit_success", "portability",
              "drawdown_ppl", "drawdown_acc", "kl_locality", "fluency", "seconds_per_edit")
BAR_KEYS = ("efficacy", "generalization", "locality", "score", "edit_success")
CURVE_KEYS = ("efficacy", "locality", "drawdown_ppl")


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def markdown_table(results: dict[str, Any]) -> str:
    rows = {"unedited": results["pre"], **{k: v["metrics"] for k, v in results["editors"].items()}}
    keys = [k for k in TABLE_KEYS if any(r.get(k) is not None for r in rows.values())]
    ds = results["dataset"]
    lines = [
        f"# {results['model']} · {ds['name']} ({ds['n']} records) · mode {results['mode']}",
        "",
        "| editor | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def plot_metrics(results: dict[str, Any], path: Path) -> Path:
    """Grouped bars: one group per metric, one bar per editor (and the unedited model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"unedited": results["pre"], **{k: v["metrics"] for k, v in results["editors"].items()}}
    keys = [k for k in BAR_KEYS if any(r.get(k) is not None for r in rows.values())]
    fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2, 3.6))
    width = 0.8 / len(rows)
    for j, (name, m) in enumerate(rows.items()):
        xs = [i + j * width for i in range(len(keys))]
        ax.bar(xs, [m.get(k) or 0.0 for k in keys], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{results['model']} · {results['dataset']['name']} · {results['mode']}")
    ax.legend(fontsize=8, ncols=min(4, len(rows)))
    _save_fig(fig, path)
    return path


def plot_curves(results: dict[str, Any], path: Path) -> Path | None:
    """Sequential editing: metrics against the number of edits, one line per editor."""
    curves = {k: v["curve"] for k, v in results["editors"].items() if v.get("curve")}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(4.2 * len(CURVE_KEYS), 3.4))
    for ax, key in zip(axes, CURVE_KEYS):
        for name, curve in curves.items():
            pts = [(p["edits"], p[key]) for p in curve if p.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xlabel("edits")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['model']} · {results['dataset']['name']} · sequential", y=1.03)
    _save_fig(fig, path)
    return path


def write_reports(results: dict[str, Any], out: str | Path) -> dict[str, Path]:
    out = Path(out)
    paths = {"json": write_json(out / "results.json", results),
             "markdown": write_text(out / "results.md", markdown_table(results)),
             "metrics_plot": plot_metrics(results, out / "metrics.png")}
    curve = plot_curves(results, out / "curve.png")
    if curve:
        paths["curve_plot"] = curve
    return paths
