"""quality.py: deletion/insertion, randomisation, localisation, and the stored quality pass."""
import pytest
import torch

import data
import db
import evaluate
import explain
import model as model_lib
import quality as quality_lib


@pytest.fixture(scope="module")
def quality(trained_run, syn_dir):
    """Quality measures of default IG for 60 synthetic test images (model trained 4 epochs)."""
    net, meta = model_lib.load_checkpoint(trained_run / "best.pt")
    fused = model_lib.fused_for_inference(net)
    test = data.load_matching(meta["provenance"], syn_dir).test
    _, targets, r = explain.explain_batch(fused, test.images[:60], test.labels[:60], explain.DEFAULT_IG)
    q = quality_lib.quality_measures(fused, data.to_unit(test.images[:60]), targets, r.attributions,
                                     explain.DEFAULT_IG, explain.attribution_fn(explain.DEFAULT_IG),
                                     quality_lib.randomized_models(net), masks=test.masks[:60])
    return {k: v.float().mean(0) for k, v in q.items()}


def test_deleting_the_top_attributed_pixels_first_drops_the_class_faster_than_random(quality):
    assert quality["deletion_auc"] < quality["deletion_auc_random"] - 0.1


def test_inserting_the_top_attributed_pixels_first_restores_the_class_faster_than_random(quality):
    assert quality["insertion_auc"] > quality["insertion_auc_random"] + 0.1


def test_randomising_the_weights_lowers_the_rank_correlation_clearly(quality):
    stages = quality["randomization_stages"]
    assert quality["randomization_spearman"] < 0.8
    assert quality["randomization_spearman"] < stages[0]  # full randomisation below top layer only
    assert quality["randomization_spearman_signed"].abs() < 0.3


def test_attribution_mass_in_the_evidence_mask_exceeds_its_area_share(quality):
    assert quality["mask_mass"] > quality["mask_area"] + 0.2


def test_maps_that_ignore_the_model_fail_the_randomisation_check(trained_run, syn_dir):
    net, meta = model_lib.load_checkpoint(trained_run / "best.pt")
    test = data.load_matching(meta["provenance"], syn_dir).test
    x = data.to_unit(test.images[:8])
    blind = lambda model, inputs, target: inputs * 2 - 1  # noqa: E731  the same map whatever the model
    q = quality_lib.quality_measures(net, x, test.labels[:8], blind(net, x, None), explain.DEFAULT_IG,
                                     blind, quality_lib.randomized_models(net))
    assert float(q["randomization_spearman"].mean()) == pytest.approx(1.0)
    assert quality_lib.randomization_verdict(1.0, float(q["randomization_input_spearman"].mean())) == "failed"


def test_randomization_verdict_allows_what_the_input_alone_explains():
    assert quality_lib.randomization_verdict(0.3, 0.2) == "passed"
    assert quality_lib.randomization_verdict(0.6, 0.65) == "passed"  # within the input-only reference
    assert quality_lib.randomization_verdict(0.9, 0.65) == "failed"


def test_cascading_randomization_reinitialises_one_more_layer_each_stage(trained_run):
    net, _ = model_lib.load_checkpoint(trained_run / "best.pt")
    stages = quality_lib.randomized_models(net)
    assert [s for s, _ in stages] == model_lib.randomization_layers(net)
    trained_conv0 = model_lib.fused_for_inference(net).features[0][0].weight
    assert torch.equal(stages[-2][1].features[0][0].weight, trained_conv0)  # features.0 not yet
    assert not torch.equal(stages[-1][1].features[0][0].weight, trained_conv0)


def test_curves_start_at_the_image_and_end_at_the_baseline():
    net = model_lib.build().eval()
    x = torch.rand(3, 3, 28, 28)
    base = explain.make_baseline(x, "mean", model_lib.input_mean(net))
    order = quality_lib.pixel_order(torch.randn(3, 3, 28, 28))
    target = torch.zeros(3, dtype=torch.long)
    deletion = quality_lib.perturbation_curves(net, x, base, order, target, insertion=False)
    with torch.no_grad():
        p_x, p_b = (torch.softmax(net(t), 1)[:, 0] for t in (x, base))
    assert torch.allclose(deletion[:, 0], p_x, atol=1e-6) and torch.allclose(deletion[:, -1], p_b, atol=1e-6)
    insertion = quality_lib.perturbation_curves(net, x, base, order, target, insertion=True)
    assert torch.allclose(insertion[:, 0], p_b, atol=1e-6) and torch.allclose(insertion[:, -1], p_x, atol=1e-6)


def test_completeness_warning_names_more_steps():
    summary = {"completeness_share": 0.6, "deletion_auc": 0.1, "deletion_auc_random": 0.5,
               "insertion_auc": 0.9, "insertion_auc_random": 0.5, "randomization_check": "passed"}
    lines = quality_lib.quality_warnings(summary, "ig", {**explain.DEFAULT_IG, "n_steps": 8, "max_steps": 8})
    assert len(lines) == 1 and "--max-steps 16" in lines[0]


# ----------------------------------------------------------------------------- the stored pass

def test_quality_rows_are_stored_once_per_image_and_method(evaluated_run, syn_dir):
    run_dir, metrics = evaluated_run
    conn = db.connect(run_dir / "explanations.db", create=False)
    count = lambda: conn.execute("SELECT COUNT(*) FROM quality").fetchone()[0]  # noqa: E731
    assert count() == 60
    evaluate.main(["--checkpoint", str(run_dir / "best.pt"), "--data-dir", str(syn_dir), "--explain", "60",
                   "--images", str(run_dir / "images")])
    assert count() == 60
    run = metrics["ig"]["run_id"]
    first = db.find(conn, run, limit=1)[0]["image_index"]
    row = db.quality_rows(conn, run, "test", "ig", [first])[0]
    assert row["deletion_curve"].shape == (quality_lib.CURVE_POINTS,)
    assert list(row["randomization_stages"]) == ["classifier", "features.4", "features.3", "features.2",
                                                 "features.1", "features.0"]


def test_smoothgrad_is_compared_on_the_same_measures(trained_run, syn_dir, tmp_path):
    m = evaluate.main(["--checkpoint", str(trained_run / "best.pt"), "--data-dir", str(syn_dir),
                       "--explain", "8", "--quality", "8", "--smooth", "2", "--db", str(tmp_path / "e.db"),
                       "--images", str(tmp_path)])
    smooth = m["smoothgrad_ig:n=2,sd=0.1"]
    for key in quality_lib.SUMMARY_KEYS:
        assert key in smooth and key in m
    assert smooth["images"] == 8
