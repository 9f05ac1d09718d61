"""Heatmaps of causal traces: tokens (rows) × layers (columns), one panel per kind, in the paper's colours
(residual stream purple, MLP green, attention red)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from locate_edit.trace.average import ROWS, AverageTrace
from locate_edit.trace.core import FactTrace
from mend.io import atomic_write

CMAPS = {"residual": "Purples", "mlp": "Greens", "attn": "Reds"}


def _title(kind: str, window: int) -> str:
    return {"residual": "residual stream (block output)", "mlp": f"MLP output (window {window})",
            "attn": f"attention output (window {window})"}[kind]


def plot_heatmaps(effects: dict[str, torch.Tensor], labels: Sequence[str], path: str | Path, title: str,
                  window: int, bold: Sequence[int] = ()) -> Path:
    """One panel per kind of an (R, L) matrix of indirect effects, rows named by ``labels`` (rows in ``bold``
    emphasised, e.g. the subject's tokens); NaN cells are left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(effects)
    n_rows, n_layers = next(iter(effects.values())).shape
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 + 0.12 * n_layers * len(kinds) + 1.4 * len(kinds),
                                                      1.3 + 0.3 * n_rows), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        m = effects[kind].float().numpy()
        cmap = matplotlib.colormaps[CMAPS[kind]].with_extremes(bad="white")
        finite = m[m == m]
        vmax = float(finite.max()) if finite.size else 1.0
        vmin = min(0.0, float(finite.min())) if finite.size else 0.0
        im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-6, aspect="auto",
                       interpolation="nearest")
        ax.set_yticks(range(n_rows), labels if ax is axes[0][0] else [""] * n_rows)
        for i in bold if ax is axes[0][0] else ():
            ax.get_yticklabels()[i].set_fontweight("bold")
        ax.set_xlabel("layer")
        ax.set_title(_title(kind, window), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)


def plot_fact(trace: FactTrace, path: str | Path, window: int, model: str = "") -> Path:
    """A fact's heatmap: every prompt token (the subject's marked with *) × layers."""
    s0, s1 = trace.subject_range
    labels = [(t if t.strip() else repr(t)) + (" *" if s0 <= i < s1 else "") for i, t in enumerate(trace.tokens)]
    title = (f"{model}  {trace.text!r} → {trace.answer!r}: p clean {trace.p_clean:.3f}, "
             f"corrupted {trace.p_corrupted:.3f} (indirect effect = p restored − p corrupted)")
    return plot_heatmaps(trace.effects, labels, path, title, window, bold=range(s0, s1))


def plot_average(avg: AverageTrace, path: str | Path, window: int, model: str = "") -> Path:
    """The averaged heatmap with the paper's six token rows."""
    labels = [f"{r} ({c})" for r, c in zip(ROWS, avg.counts)]
    title = (f"{model}  average indirect effect over {avg.n_facts} facts: p clean {avg.p_clean:.3f}, "
             f"corrupted {avg.p_corrupted:.3f}")
    return plot_heatmaps(avg.effects, labels, path, title, window, bold=[2])
