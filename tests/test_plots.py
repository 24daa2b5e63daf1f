"""Tests for hvaeood.plots: files written atomically, valid PNGs, grid geometry."""

import os
import subprocess
import sys

import numpy as np
import pytest

from hvaeood import ood_metrics as om
from hvaeood import plots

Image = pytest.importorskip("PIL.Image")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODULE_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "hvaeood", "plots.py")


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as im:
        im.load()
        return im.size, im.mode, np.asarray(im)


def _only_file(directory, name):
    assert sorted(os.listdir(directory)) == [name], "temporary files left behind"


def _toy_scores(seed=0):
    rng = np.random.default_rng(seed)
    in_scores = {"LLR>1": rng.normal(0, 1, 300), "-L>1": rng.normal(100, 5, 300)}
    ood = {
        "MNIST": {"LLR>1": rng.normal(2, 1, 200), "-L>1": rng.normal(110, 5, 200)},
        "KMNIST": {"LLR>1": rng.normal(0.5, 1, 400), "-L>1": rng.normal(98, 5, 400)},
        "Omniglot": {"LLR>1": rng.normal(1, 1, 100), "-L>1": rng.normal(120, 5, 100)},
    }
    return in_scores, ood


# --------------------------------------------------------------------------- #
# image grids
# --------------------------------------------------------------------------- #
def test_image_grid_grayscale_size_and_content(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.uniform(size=(6, 28, 28, 1))
    out = tmp_path / "grid.png"
    ret = plots.save_image_grid(imgs, out, ncols=3)
    assert os.path.samefile(ret, out)
    size, mode, arr = _assert_png(out)
    # 3 cols: 3*28 + 2 separators = 86 wide; 2 rows: 2*28 + 1 = 57 high
    assert size == (86, 57)
    assert mode == "L"
    expected = np.rint(imgs * 255).astype(np.uint8)[..., 0]
    np.testing.assert_array_equal(arr[0:28, 0:28], expected[0])
    np.testing.assert_array_equal(arr[0:28, 29:57], expected[1])
    np.testing.assert_array_equal(arr[29:57, 58:86], expected[5])
    assert np.all(arr[:, 28] == 255) and np.all(arr[28, :] == 255)  # separators
    _only_file(tmp_path, "grid.png")


def test_image_grid_rgb_default_ncols_and_padding(tmp_path):
    imgs = np.zeros((5, 32, 32, 3))
    imgs[..., 0] = 1.0  # pure red
    out = tmp_path / "rgb.png"
    plots.save_image_grid(imgs, out, pad_value=0.0)
    size, mode, arr = _assert_png(out)
    # ceil(sqrt(5)) = 3 cols -> 98 wide, 2 rows -> 65 high
    assert size == (98, 65)
    assert mode == "RGB"
    np.testing.assert_array_equal(arr[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(arr[0, 32], [0, 0, 0])  # separator
    assert np.all(arr[33:, 66:] == 0)  # empty 6th cell filled with pad
    _only_file(tmp_path, "rgb.png")


def test_image_grid_accepts_nhw_uint8_and_clips(tmp_path):
    out = tmp_path / "a.png"
    plots.save_image_grid(np.full((4, 10, 12), 200, np.uint8), out, ncols=4)
    size, mode, arr = _assert_png(out)
    assert size == (4 * 12 + 3, 10) and mode == "L"
    assert arr[0, 0] == 200

    out2 = tmp_path / "b.png"
    x = np.full((1, 5, 5, 1), 1.7)
    x[0, 0, 0, 0] = -0.3
    plots.save_image_grid(x, out2)
    size, _, arr = _assert_png(out2)
    assert size == (5, 5)
    assert arr[0, 0] == 0 and arr[1, 1] == 255


def test_image_grid_ncols_larger_than_n(tmp_path):
    out = tmp_path / "c.png"
    plots.save_image_grid(np.zeros((2, 8, 8, 1)), out, ncols=10)
    size, _, _ = _assert_png(out)
    assert size == (17, 8)


def test_image_grid_rejects_bad_input_and_writes_nothing(tmp_path):
    bad = np.zeros((2, 8, 8, 1))
    bad[1, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        plots.save_image_grid(bad, tmp_path / "x.png")
    with pytest.raises(ValueError):
        plots.save_image_grid(np.zeros((2, 8, 8, 2)), tmp_path / "x.png")
    with pytest.raises(ValueError):
        plots.save_image_grid(np.zeros((8, 8)), tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_atomic_write_failure_keeps_old_file_and_cleans_temp(tmp_path, monkeypatch):
    out = tmp_path / "grid.png"
    out.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("simulated failure")

    monkeypatch.setattr(plots.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        plots.save_image_grid(np.zeros((1, 4, 4, 1)), out)
    assert out.read_bytes() == b"old"
    _only_file(tmp_path, "grid.png")


def test_creates_missing_directory(tmp_path):
    out = tmp_path / "a" / "b" / "g.png"
    plots.save_image_grid(np.ones((1, 3, 3, 1)), out)
    _assert_png(out)
    _only_file(out.parent, "g.png")


# --------------------------------------------------------------------------- #
# figures
# --------------------------------------------------------------------------- #
def test_plot_roc_writes_png(tmp_path):
    in_scores, ood = _toy_scores()
    curves = om.ood_roc_curves(in_scores, ood, seed=0)
    out = tmp_path / "roc.png"
    plots.plot_roc(curves, out, title="FashionMNIST")
    size, _, arr = _assert_png(out)
    assert size[0] > 200 and size[1] > 200
    assert arr.std() > 0  # something was drawn
    _only_file(tmp_path, "roc.png")


def test_plot_roc_rejects_mismatched_curve(tmp_path):
    with pytest.raises(ValueError):
        plots.plot_roc({"X": {"s": (np.array([0, 1.0]), np.array([0, 0.5, 1.0]))}},
                       tmp_path / "r.png")
    assert os.listdir(tmp_path) == []


def test_plot_histograms_writes_png(tmp_path):
    in_scores, ood = _toy_scores()
    del ood["Omniglot"]["-L>1"]  # a missing panel is allowed
    out = tmp_path / "hist.png"
    plots.plot_histograms(in_scores, ood, out, bins=30)
    size, _, _ = _assert_png(out)
    # rows = 3 OOD sets, cols = 2 scores -> taller than wide-ish figure
    assert size[1] > size[0] * 0.9
    _only_file(tmp_path, "hist.png")


def test_plot_histograms_rejects_nonfinite(tmp_path):
    in_scores, ood = _toy_scores()
    ood["MNIST"]["LLR>1"] = ood["MNIST"]["LLR>1"].copy()
    ood["MNIST"]["LLR>1"][0] = np.inf
    with pytest.raises(ValueError, match="LLR>1"):
        plots.plot_histograms(in_scores, ood, tmp_path / "h.png")
    assert os.listdir(tmp_path) == []


def test_plots_import_is_lazy():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('p', {os.path.abspath(MODULE_PATH)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert 'matplotlib' not in sys.modules\n"
        "assert 'PIL' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
