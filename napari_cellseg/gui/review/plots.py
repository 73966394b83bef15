"""Matplotlib drawing for the Review dock: per-IoU bars and the threshold heat map (no state)."""

from __future__ import annotations

BG = "#262930"  # napari dark theme
FG = "#d6d6d6"


def figure(height):
    """A dark-themed matplotlib figure and its Qt canvas for the dock."""
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2, height), dpi=100, facecolor=BG, layout="constrained")
    canvas = FigureCanvasQTAgg(fig)
    canvas.setMinimumHeight(int(height * 100))
    return fig, canvas


def style(ax):
    """napari dark-theme colours on an axes."""
    ax.set_facecolor(BG)
    ax.tick_params(colors=FG, labelsize=7)
    for s in ax.spines.values():
        s.set_color("#5a5f6a")
    ax.xaxis.label.set_color(FG)
    ax.yaxis.label.set_color(FG)
    ax.title.set_color(FG)


def draw_bars(fig, score):
    """TP/(TP+FP+FN) per IoU threshold (the chosen IoU in white); ``score``: metrics.ImageScore."""
    from napari_cellseg.inference.metrics import THRESHOLDS

    fig.clear()
    ax = fig.add_subplot(111)
    style(ax)
    if score is not None:
        vals = [score.per_threshold[float(t)] for t in THRESHOLDS]
        colors = ["#4fc3f7" if abs(t - score.iou) > 1e-6 else "#ffffff" for t in THRESHOLDS]
        bars = ax.bar([f"{t:.2f}"[1:] for t in THRESHOLDS], vals, color=colors, width=0.75)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.02, f"{v:.2f}"[1:] if v < 1 else "1",
                    ha="center", va="bottom", fontsize=6, color=FG)
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("IoU threshold", fontsize=7)
    ax.set_ylabel("TP/(TP+FP+FN)", fontsize=7)


def draw_heat(fig, res):
    """mAP heat map of a tuning.SweepResult (None: a "press Sweep" hint), best pair starred."""
    fig.clear()
    ax = fig.add_subplot(111)
    style(ax)
    ax.set_xlabel("Mask threshold", fontsize=7)
    ax.set_ylabel("Box confidence", fontsize=7)
    if res is None:
        ax.text(0.5, 0.5, "press Sweep", ha="center", va="center", color=FG, fontsize=8,
                transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        m, b = res.mask_thresholds, res.box_confs
        dm = (m[1] - m[0]) / 2 if len(m) > 1 else 0.05
        db = (b[1] - b[0]) / 2 if len(b) > 1 else 0.05
        im = ax.imshow(res.map, origin="lower", aspect="auto", cmap="viridis",
                       extent=(m[0] - dm, m[-1] + dm, b[0] - db, b[-1] + db))
        ax.plot([res.best["mask_threshold"]], [res.best["box_conf"]], marker="*", ms=12,
                color="#ff3b3b", mec="white", mew=0.8, ls="none")
        cb = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.02)
        cb.ax.tick_params(colors=FG, labelsize=6)
        cb.set_label("mAP", color=FG, fontsize=7)
