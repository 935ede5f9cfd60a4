"""plots.py: every figure opened as a picture: true colours, panels, not blank, written atomically."""
import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import plots

TISSUE = (200, 100, 50)  # a colour no colormap or grey overlay produces by accident


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def count_colour(arr, rgb):
    return int((arr == np.array(rgb, np.uint8)).all(-1).sum())


def flat_image(rgb=TISSUE, size=28):
    return (torch.tensor(rgb, dtype=torch.float32) / 255).view(3, 1, 1).expand(3, size, size).clone()


def test_explanation_shows_the_tissue_in_its_true_colours(tmp_path):
    attribution = torch.randn(3, 28, 28, generator=torch.Generator().manual_seed(0))
    plots.explanation_figure([(flat_image(), attribution, "a")], tmp_path / "e.png", "title")
    # Drawn 28 px wide at over 100 px: thousands of pixels keep the exact input colour.
    assert count_colour(pixels(tmp_path / "e.png"), TISSUE) > 1000


def test_gallery_draws_two_explanations_per_row(tmp_path):
    panel = (flat_image(), torch.randn(3, 28, 28), "a")
    plots.explanation_figure([panel] * 2, tmp_path / "two.png", "t")
    plots.explanation_figure([panel] * 6, tmp_path / "six.png", "t")
    two, six = pixels(tmp_path / "two.png"), pixels(tmp_path / "six.png")
    assert two.shape[1] == six.shape[1]  # same width: two explanations side by side
    assert six.shape[0] > 2 * two.shape[0]  # three rows instead of one
    assert count_colour(six, TISSUE) > 2.5 * count_colour(two, TISSUE)


def test_empty_slots_keep_one_class_a_row(tmp_path):
    panel = (flat_image(), torch.randn(3, 28, 28), "a")
    plots.explanation_figure([panel, panel, panel], tmp_path / "full.png", "t", per_row=3)
    plots.explanation_figure([panel, None, None, panel, panel, None], tmp_path / "gaps.png", "t", per_row=3)
    full, gaps = pixels(tmp_path / "full.png"), pixels(tmp_path / "gaps.png")
    assert full.shape[1] == gaps.shape[1] and gaps.shape[0] > 1.5 * full.shape[0]  # two rows of three slots
    assert count_colour(gaps, TISSUE) == pytest.approx(count_colour(full, TISSUE), rel=0.05)  # three drawn


def test_zero_attribution_still_draws_the_image(tmp_path):
    plots.explanation_figure([(flat_image(), torch.zeros(3, 28, 28), "a")], tmp_path / "z.png", "t")
    assert count_colour(pixels(tmp_path / "z.png"), TISSUE) > 1000


def test_randomization_figure_has_a_panel_per_map(tmp_path):
    maps = [(f"m{i}", torch.randn(3, 28, 28)) for i in range(3)]
    plots.plot_randomization_rows(flat_image(), [("", maps[:1], [])], tmp_path / "one.png", "t")
    plots.plot_randomization_rows(flat_image(), [("", maps, [0.5, 0.2])], tmp_path / "three.png", "t")
    one, three = pixels(tmp_path / "one.png"), pixels(tmp_path / "three.png")
    assert three.shape[1] > 1.7 * one.shape[1]
    assert count_colour(three, TISSUE) > 500


def test_confusion_matrix_shades_cells_by_share_of_the_true_class(tmp_path):
    plots.plot_confusion([[90, 10], [0, 100]], ["a", "b"], tmp_path / "c.png", "t")
    arr = pixels(tmp_path / "c.png")
    blues = (arr[..., 2] > arr[..., 0] + 60)  # dark cells of the Blues colormap
    assert blues.mean() > 0.2


def test_curves_are_not_blank(tmp_path):
    history = [{"epoch": e, "train_acc": 0.5 + e / 20, "val_acc": 0.5 + e / 25,
                "train_loss": 1 / e, "val_loss": 1.2 / e, "lr": 1e-3} for e in range(1, 6)]
    plots.plot_history(history, tmp_path / "h.png", "t")
    curves = {"ig": {f"{k}_curve{s}": np.random.default_rng(0).random((4, 29)) for k in ("deletion", "insertion")
                     for s in ("", "_random")}}
    curves["ig"].update({f"{k}_auc{s}": 0.5 for k in ("deletion", "insertion") for s in ("", "_random")})
    plots.plot_faithfulness(curves, tmp_path / "f.png", "t")
    for name in ("h.png", "f.png"):
        arr = pixels(tmp_path / name)
        assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 20, name  # lines, text and legends


def test_a_failed_save_keeps_the_previous_figure_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "e.png"
    plots.explanation_figure([(flat_image(), torch.randn(3, 28, 28), "a")], path, "first")
    before = path.read_bytes()
    monkeypatch.setattr(plots.plt.Figure, "savefig", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        plots.explanation_figure([(flat_image((0, 0, 0)), torch.randn(3, 28, 28), "b")], path, "second")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["e.png"]


def test_panel_titles_wrap_long_class_names_to_the_panel_width():
    title = plots.panel_title(datasets.CLASS_NAMES, 8, 7, 0.87, ["WRONG"])
    assert all(len(line) <= plots.TITLE_WIDTH for line in title.splitlines())
    assert " ".join(title.split()) == ("true colorectal adenocarcinoma epithelium pred cancer-associated "
                                       "stroma (87.0%) WRONG")


def test_rows_grow_to_fit_long_titles(tmp_path):
    image = flat_image()
    short = plots.panel_title(["a", "b"], 0, 1, 0.5)
    long = plots.panel_title(datasets.CLASS_NAMES, 8, 7, 0.5, ["WRONG"])
    plots.explanation_figure([(image, torch.randn(3, 28, 28), short)] * 2, tmp_path / "s.png", "t")
    plots.explanation_figure([(image, torch.randn(3, 28, 28), long)] * 2, tmp_path / "l.png", "t")
    assert pixels(tmp_path / "l.png").shape[0] > pixels(tmp_path / "s.png").shape[0]
    assert count_colour(pixels(tmp_path / "l.png"), TISSUE) >= count_colour(pixels(tmp_path / "s.png"), TISSUE) * 0.9


def test_a_multi_label_title_names_every_true_label_or_none():
    names = ["atelectasis", "cardiomegaly", "effusion"]
    assert plots.panel_title(names, [0, 2], 2, 0.7).startswith("true atelectasis,\neffusion")
    assert plots.panel_title(names, [], 1, 0.3).startswith("true none\n")


def test_training_curves_mark_the_best_epoch_and_each_learning_rate_drop(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plots, "write_figure", lambda fig, path, dpi=130: drawn.setdefault("fig", fig))
    lrs = [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]
    history = [{"epoch": e, "train_acc": 0.5, "val_acc": 0.5, "train_loss": 1.0, "val_loss": 1.0, "lr": lr}
               for e, lr in enumerate(lrs, start=1)]
    plots.plot_history(history, tmp_path / "h.png", "t", best_epoch=4)
    ax = drawn["fig"].axes[0]
    vertical = sorted(line.get_xdata()[0] for line in ax.lines if len(set(line.get_xdata())) == 1)
    assert vertical == [3, 4, 5]  # drops at epochs 3 and 5, best epoch 4
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "best epoch (4)" in labels and labels.count("learning rate halved") == 1


def largest_other_colour(arr):
    """The share of the picture taken by its commonest colour other than white and the tissue's."""
    colours, counts = np.unique(arr.reshape(-1, 3), axis=0, return_counts=True)
    keep = ~((colours == 255).all(1) | (colours == np.array(TISSUE)).all(1))
    return float(counts[keep].max() / counts.sum())


def test_a_constant_map_is_drawn_as_a_marked_blank_panel_not_a_solid_square(tmp_path):
    constant = torch.full((3, 28, 28), 0.3)
    plots.plot_randomization_rows(flat_image(), [("", [("trained", constant)], [])], tmp_path / "c.png", "t")
    # scaled to its own range, the map would fill its panel with one colour, as large as the image (22%)
    assert largest_other_colour(pixels(tmp_path / "c.png")) < 0.05
    varied = torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(0))
    near = constant + 0.01 * torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(1))  # varies by ~3%
    assert plots.flat(constant) and plots.flat(near) and not plots.flat(varied)


def test_a_tile_figure_shows_the_tile_as_read_beside_the_models_input(tmp_path):
    green = (10, 200, 30)
    plots.tile_figure(flat_image(TISSUE, 224), flat_image(green), torch.randn(3, 28, 28), ["t.png\nas read", "x"],
                      tmp_path / "t.png", "title")
    drawn = pixels(tmp_path / "t.png")
    assert count_colour(drawn, TISSUE) > 1000 and count_colour(drawn, green) > 1000
