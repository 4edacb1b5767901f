"""Pictures: training curves, image | ground truth | prediction | prediction + CRF grids, colour
overlays.  Matplotlib without a screen (Agg); every file is written atomically."""

import numpy as np

from .data import IGNORE, voc_colormap


def colorize(mask):
    """Class indices (H, W) -> RGB (H, W, 3) in the VOC palette (void 255 is cream)."""
    return voc_colormap()[np.asarray(mask, np.uint8)]


def overlay(image, mask, alpha=0.5):
    """The image with the mask's colours blended in (void and background left as they are)."""
    colours = colorize(mask).astype(np.float32)
    keep = ((mask == 0) | (mask == IGNORE))[..., None]
    out = np.where(keep, image, (1 - alpha) * image + alpha * colours)
    return out.astype(np.uint8)


def _figure_to(path, fig):
    import matplotlib.pyplot as plt

    from .models import atomic_write

    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_curves(history, path):
    """Loss and learning rate against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [h["iteration"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(it, [h["loss"] for h in history], lw=0.8)
    a.set(xlabel="iteration", ylabel="loss", title="training loss", yscale="log")
    b.plot(it, [h["lr"] for h in history])
    b.set(xlabel="iteration", ylabel="learning rate", title="poly learning rate")
    _figure_to(path, fig)


def save_grid(rows, path, titles=("image", "ground truth", "prediction", "prediction + CRF")):
    """rows: tuples (image, label, prediction[, prediction after CRF]) of equal sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(rows[0])
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.2 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, item in enumerate(row):
            axes[r, c].imshow(item if c == 0 else colorize(item), interpolation="nearest")
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=9)
    _figure_to(path, fig)


def plot_confusion(matrix, class_names, path, title="confusion matrix"):
    """The confusion matrix as a picture: row t shows where class t's pixels went, as a
    share of that class (rows sum to 1; empty rows stay blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    M = np.asarray(matrix, np.float64)
    rows = M.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(rows > 0, M / rows, np.nan)
    n = len(class_names)
    size = max(4.0, 0.38 * n + 1.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for t in range(n):
        for p in range(n):
            if np.isfinite(share[t, p]) and share[t, p] >= 0.005:
                ax.text(p, t, f"{100 * share[t, p]:.0f}", ha="center", va="center",
                        fontsize=6, color="white" if share[t, p] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    _figure_to(path, fig)
