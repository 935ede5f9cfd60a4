"""trust.py: the published tests' thresholds from the controls, verdicts, and the method to lead with."""
import pytest

import trust

RANDOM_ORDER = {"deletion_auc_random": 0.45, "insertion_auc_random": 0.44}


def summary(**values):
    return {"images": 10, **RANDOM_ORDER, **values}


def controls(**overrides):
    """The three controls as the demo measures them: model-free maps stay the same under
    randomisation and across classes, the random map changes every call."""
    out = {"control:random": summary(deletion_auc=0.45, insertion_auc=0.44, road_lerf=0.49, road_morf=0.54,
                                     randomization_bottom_up_spearman=0.0, smooth_mprt=0.0, efficient_mprt=0.007,
                                     efficient_mprt_sd=0.02, random_logit=0.0, mask_mass=0.23),
           "control:input": summary(deletion_auc=0.42, insertion_auc=0.60, road_lerf=0.36, road_morf=0.45,
                                    randomization_bottom_up_spearman=1.0, smooth_mprt=0.85, efficient_mprt=0.0,
                                    random_logit=1.0, mask_mass=0.23),
           "control:edge": summary(deletion_auc=0.29, insertion_auc=0.43, road_lerf=0.48, road_morf=0.22,
                                   randomization_bottom_up_spearman=1.0, smooth_mprt=0.96, efficient_mprt=0.0,
                                   random_logit=1.0, mask_mass=0.24),
           # a one-step IG: a real explainer, so it may pass the others; its maps do not add up
           "control:ig_1step": summary(deletion_auc=0.2, insertion_auc=0.6, road_lerf=0.8, road_morf=0.3,
                                       randomization_bottom_up_spearman=0.3, smooth_mprt=0.3, efficient_mprt=0.1,
                                       random_logit=0.3, mask_mass=0.4, completeness_share=0.2)}
    out.update(overrides)
    return out


GOOD = dict(deletion_auc=0.1, insertion_auc=0.7, road_lerf=0.9, road_morf=0.2, randomization_bottom_up_spearman=0.3,
            smooth_mprt=0.3, efficient_mprt=0.2, random_logit=0.2, mask_mass=0.5, completeness_share=1.0)


def test_randomisation_thresholds_lie_midway_between_the_random_map_and_the_nearest_model_free_control():
    limits = trust.thresholds(controls())
    assert limits["mprt"] == pytest.approx(0.5) and limits["random_logit"] == pytest.approx(0.5)
    assert limits["smooth_mprt"] == pytest.approx((0.0 + 0.85) / 2)  # the input-only control is the nearer
    assert limits["efficient_mprt"] == pytest.approx(0.007 + 0.02)  # above every control's rise, by noise's spread
    assert limits["localisation"] == 0.24


def test_faithfulness_thresholds_are_the_best_control_or_random_order():
    limits = trust.thresholds(controls())
    assert limits["road"] == pytest.approx(0.48 - 0.22)  # the edge map's gap beats a random ranking's
    assert limits["deletion"] == 0.29  # the edge map's, below the random order's 0.45
    assert limits["insertion"] == 0.60  # the input-only map's, above the random order's 0.44


def test_a_map_that_beats_only_the_random_order_fails_deletion_insertion_and_road():
    table = trust.trust_table(controls(ig=summary(**{**GOOD, "deletion_auc": 0.35, "insertion_auc": 0.5,
                                                     "road_lerf": 0.5, "road_morf": 0.4})))
    assert not any(table["ig"][t]["pass"] for t in ("deletion", "insertion", "road"))
    assert all(table["ig"][t]["pass"] for t in ("mprt", "smooth_mprt", "random_logit", "localisation"))


def test_every_test_is_failed_by_each_control_that_must_fail_it():
    table = trust.trust_table(controls())
    assert set(trust.thresholds(controls())) == {t.name for t in trust.TESTS}
    for test in trust.TESTS:
        assert test.must_fail and all(not table[c][test.name]["pass"] for c in test.must_fail), test.name
    assert trust.uninformative(table) == {}


def test_a_test_that_a_must_fail_control_passes_is_named_uninformative():
    # a one-step IG within tolerance everywhere: completeness then tells nothing on this run
    summaries = controls(**{"control:ig_1step": summary(**{**GOOD, "completeness_share": 1.0})})
    table = trust.trust_table(summaries)
    assert trust.uninformative(table) == {"completeness": ["control:ig_1step"]}
    assert "completeness is passed by control:ig_1step" in trust.uninformative_lines(table)[0]


def test_a_rise_in_complexity_within_the_random_maps_spread_fails_emprt():
    table = trust.trust_table(controls(ig=summary(**{**GOOD, "efficient_mprt": 0.02}),
                                       gradcam=summary(**{**GOOD, "efficient_mprt": 0.05})))
    assert not table["ig"]["efficient_mprt"]["pass"] and table["gradcam"]["efficient_mprt"]["pass"]
    assert not table["control:random"]["efficient_mprt"]["pass"]  # it passed at the old threshold 0


def test_model_free_controls_fail_every_randomisation_test():
    table = trust.trust_table(controls())
    for control in trust.MODEL_FREE:
        assert not any(table[control][t]["pass"] for t in ("mprt", "smooth_mprt", "efficient_mprt", "random_logit"))


def test_a_method_that_passes_everything_is_recommended_over_a_better_one_that_fails_a_test():
    summaries = controls(ig=summary(**GOOD), gradcam=summary(**{**GOOD, "road_lerf": 0.95}),
                         saliency=summary(**{**GOOD, "road_lerf": 0.99, "random_logit": 0.9}))
    table = trust.trust_table(summaries)
    assert not table["saliency"]["random_logit"]["pass"]  # the largest ROAD gap, but class-blind
    assert trust.recommended(table, summaries) == "gradcam"


def test_completeness_is_asked_of_ig_type_methods_only():
    summaries = controls(ig=summary(**GOOD), ig_noise=summary(**{**GOOD, "completeness_share": 0.2}),
                         expected_gradients=summary(**{**GOOD, "completeness_share": 0.2}),
                         gradcam=summary(**GOOD))
    table = trust.trust_table(summaries)
    assert table["ig"]["completeness"]["pass"] and not table["ig_noise"]["completeness"]["pass"]
    assert "completeness" not in table["expected_gradients"] and "completeness" not in table["gradcam"]
    assert trust.recommended(table, summaries) in ("expected_gradients", "gradcam", "ig")  # ig_noise is out


def test_no_method_is_recommended_when_none_passes_everything():
    summaries = controls(ig=summary(**{**GOOD, "randomization_bottom_up_spearman": 0.9}))
    assert trust.recommended(trust.trust_table(summaries), summaries) is None


def test_a_failed_test_is_explained_in_words_and_the_stored_ig_gets_step_advice():
    summaries = controls(ig=summary(**{**GOOD, "randomization_bottom_up_spearman": 0.9}))
    lines = trust.explain_failures("ig", trust.trust_table(summaries)["ig"])
    assert len(lines) == 1 and "MPRT (bottom-up)" in lines[0] and "0.900" in lines[0]
    advice = trust.completeness_advice("ig", {"completeness_share": 0.6}, {"max_steps": 8, "n_steps": 8,
                                                                          "tolerance": 0.05})
    assert "--max-steps 16" in advice and trust.completeness_advice("gradcam", {}, {}) is None


def test_a_method_missing_a_scored_test_is_never_recommended():
    # e.g. quality rows stored before a test existed: passing the rest does not make it trusted
    old = {k: v for k, v in GOOD.items() if k not in ("smooth_mprt", "efficient_mprt", "random_logit")}
    summaries = controls(ig=summary(**{**GOOD, "road_lerf": 0.5}), occlusion=summary(**old))
    table = trust.trust_table(summaries)
    assert all(t["pass"] for t in table["occlusion"].values()) and "random_logit" not in table["occlusion"]
    assert trust.recommended(table, summaries) == "ig"
