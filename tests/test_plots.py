import numpy as np
import pytest
from PIL import Image

from unbleed.io.plots import bar_plot, image_grid


def solid(colour, size=20):
    return Image.new("RGB", (size, size), colour)


def test_image_grid_places_cells_in_rows_and_columns():
    rows = [("sd", [solid("red"), solid("red"), solid("red")]), ("ela", [solid("blue"), solid("blue")])]
    grid = image_grid(rows, col_labels=["seed 0", "seed 1", "seed 2"], title="a cat and a frog", cell=30)
    arr = np.asarray(grid)
    # three columns of 30-px cells with 4-px gaps, plus a label column on the left
    assert grid.width > 3 * 30 + 4 * 4 and grid.height > 2 * 30
    reds = np.all(arr == [255, 0, 0], axis=-1)
    blues = np.all(arr == [0, 0, 255], axis=-1)
    assert reds.sum() == 3 * 30 * 30 and blues.sum() == 2 * 30 * 30
    # the red row is above the blue row, and the missing third blue cell is grey, right of the blue ones
    assert np.nonzero(reds)[0].max() < np.nonzero(blues)[0].min()
    rows_blue = slice(np.nonzero(blues)[0].min(), np.nonzero(blues)[0].max() + 1)
    grey = np.all(arr[rows_blue] == [235, 235, 235], axis=-1)
    assert grey.sum() == 30 * 30 and np.nonzero(grey)[1].min() > np.nonzero(blues)[1].max()
    # labels (black text) lie left of the cells and above them
    dark = np.all(arr < 100, axis=-1) & ~blues
    left = np.nonzero(reds)[1].min()
    assert dark[:, :left].any()
    top = np.nonzero(reds)[0].min()
    assert dark[:top].any()


def test_image_grid_default_cell_and_errors():
    grid = image_grid([("only", [solid("green", 40)])])
    assert np.all(np.asarray(grid) == [0, 128, 0], axis=-1).sum() == 40 * 40
    with pytest.raises(ValueError):
        image_grid([])


def test_bar_plot_writes_png(tmp_path):
    path = bar_plot({"animals": {"sd": 0.3, "ela": 0.32}, "objects": {"sd": 0.28, "ela": float("nan")}},
                    tmp_path / "sub" / "bars.png", errors={"animals": {"sd": 0.01, "ela": 0.02}},
                    title="CLIP", ylabel="cosine")
    assert path == tmp_path / "sub" / "bars.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 200
        arr = np.asarray(im.convert("RGB"))
    # matplotlib's first two default colours (tab:blue, tab:orange) are both drawn
    assert (np.abs(arr.astype(int) - [31, 119, 180]).sum(-1) < 10).sum() > 100
    assert (np.abs(arr.astype(int) - [255, 127, 14]).sum(-1) < 10).sum() > 100
    with pytest.raises(ValueError):
        bar_plot({}, tmp_path / "empty.png")


def test_a_long_title_is_wrapped_inside_the_figure(tmp_path):
    """``bench-diff.png``'s title (``shapes world: 100 prompts × 4 seeds: difference from sd (paired 95 % CI)``) on
    a one-contender plot was cut at both edges; wrapped, every line fits the figure's width."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from unbleed.io.plots import wrap_title

    title = "shapes world: 100 prompts × 4 seeds: difference from sd (paired 95 % CI over prompts, bootstrap)"
    for width in (4.0, 6.0, 9.0):
        wrapped = wrap_title(title, width)
        assert wrapped.replace("\n", " ") == title
        fig = Figure(figsize=(width, 2), dpi=100)
        FigureCanvasAgg(fig)
        text = fig.text(0.5, 0.5, wrapped, ha="center", fontsize=11)
        box = text.get_window_extent(fig.canvas.get_renderer())
        assert box.x0 >= 0 and box.x1 <= width * 100, (width, box)
    assert "\n" not in wrap_title("CLIP", 4.0)
    path = bar_plot({v: {"attend-excite": 0.01} for v in ("neglected", "leak", "fused")}, tmp_path / "d.png",
                    title=title)
    assert Image.open(path).height > 200
