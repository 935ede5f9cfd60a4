"""attribution.py: IG's completeness and refinement, baselines, targets, gradients, and the mask mass of its maps."""
import numpy as np
import pytest
import torch

import attribution as attr
import colour
import data
import datasets
import model as model_lib
import trust


@pytest.fixture(scope="module")
def net_and_test(trained_run, syn_dir):
    net, meta = model_lib.load_checkpoint(trained_run / "best.pt")
    return net, data.load_matching(meta["provenance"], syn_dir).test


def test_delta_is_the_completeness_gap_against_independent_forward_passes(net_and_test):
    net, test = net_and_test
    probs, targets, r = attr.explain_batch(net, test.images[:16], test.labels[:16], attr.DEFAULT_IG)
    x = colour.to_unit(test.images[:16])
    flat = torch.tensor(net.config["mean"]).view(1, 3, 1, 1).expand_as(x)
    rows = torch.arange(16)
    with torch.no_grad():
        f_x, f_b = net(x)[rows, targets], net(flat)[rows, targets]
    assert torch.allclose(r.attributions.sum(dim=(1, 2, 3)) - (f_x - f_b), r.delta, atol=1e-4)
    assert torch.equal(targets, net(x).argmax(1))  # the default target is the prediction


def test_default_settings_keep_completeness_error_under_5_percent(net_and_test):
    # as trust.py judges completeness: a share of images, since one image whose output barely moves from
    # the baseline's has a tiny denominator and would dominate a mean
    net, test = net_and_test
    _, _, r = attr.explain_batch(net, test.images[:64], test.labels[:64], attr.DEFAULT_IG)
    assert (r.relative_error() <= attr.DEFAULT_IG["tolerance"]).float().mean() >= trust.COMPLETENESS_SHARE


def test_more_steps_shrink_the_completeness_error(net_and_test):
    net, test = net_and_test
    x = colour.to_unit(test.images[:32])
    errors = [attr.integrated_gradients(net, x, test.labels[:32], attr.DEFAULT_IG, n_steps=n).relative_error().mean()
              for n in (4, 32)]
    assert errors[1] < errors[0] / 2


def test_refinement_brings_every_image_within_tolerance_or_to_max_steps(net_and_test):
    net, test = net_and_test
    settings = {**attr.DEFAULT_IG, "n_steps": 4, "max_steps": 32, "tolerance": 0.02}
    _, targets, r = attr.explain_batch(net, test.images[:48], test.labels[:48], settings)
    within = r.relative_error() <= 0.02
    assert torch.all(within | (r.n_steps == 32))
    assert set(r.n_steps.tolist()) <= {4, 8, 16, 32} and len(set(r.n_steps.tolist())) > 1
    fixed = attr.integrated_gradients(net, colour.to_unit(test.images[:48]), targets, attr.DEFAULT_IG, n_steps=4)
    assert r.relative_error().mean() < fixed.relative_error().mean()


def test_attribution_mass_falls_inside_the_evidence_mask_more_than_random(net_and_test):
    net, test = net_and_test
    n = 100
    _, _, r = attr.explain_batch(net, test.images[:n], test.labels[:n], attr.DEFAULT_IG)
    mass = r.attributions.abs().sum(1)  # (N, H, W)
    masks = test.masks[:n].float()
    ig_share = (mass * masks).sum((1, 2)) / mass.sum((1, 2))
    random_maps = torch.rand(mass.shape, generator=torch.Generator().manual_seed(0))
    random_share = (random_maps * masks).sum((1, 2)) / random_maps.sum((1, 2))
    assert (ig_share > random_share).float().mean() >= 0.8
    assert ig_share.mean() > random_share.mean() + 0.2


def test_parameters_need_no_gradient_during_ig_and_get_theirs_back(net_and_test):
    net, test = net_and_test
    seen = []
    def record(module, inputs, output):
        if torch.is_grad_enabled():  # the passes that backpropagate, i.e. IG's
            seen.append(module.weight.requires_grad)
    hook = net.classifier.register_forward_hook(record)
    attr.explain_batch(net, test.images[:2], test.labels[:2], attr.DEFAULT_IG)
    hook.remove()
    assert seen and not any(seen)
    assert all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("baseline", attr.BASELINES)
def test_every_baseline_has_the_input_shape_and_range(baseline):
    x = torch.rand(2, 3, 28, 28)
    b = attr.make_baseline(x, baseline, [0.8, 0.6, 0.7])
    assert b.shape == x.shape and b.min() >= 0 and b.max() <= 1


def test_mean_baseline_is_a_flat_image_of_the_given_colour():
    b = attr.make_baseline(torch.rand(2, 3, 5, 5), "mean", torch.tensor([0.8, 0.6, 0.7]))
    assert torch.equal(b[1, :, 4, 2], torch.tensor([0.8, 0.6, 0.7]))
    assert torch.equal(b, b[:1, :, :1, :1].expand_as(b))


def test_ig_uses_the_models_training_mean_as_its_baseline(net_and_test):
    net, test = net_and_test
    x = colour.to_unit(test.images[:4])
    r = attr.integrated_gradients(net, x, test.labels[:4], attr.DEFAULT_IG)
    flat = torch.tensor(net.config["mean"]).view(1, 3, 1, 1).expand(4, 3, 28, 28)
    with torch.no_grad():
        expected = net(flat)[torch.arange(4), test.labels[:4]]
    assert torch.allclose(r.baseline_score, expected, atol=1e-5)


def test_target_can_be_named_by_class_name_or_index():
    names = datasets.CLASS_NAMES
    assert attr.resolve_target("debris", names) == 2
    assert attr.resolve_target("8", names) == 8
    assert attr.resolve_target("pred", names) == "pred"
    with pytest.raises(attr.ExplainError, match="not 'pred'"):
        attr.resolve_target("tumour", names)


def test_image_files_cannot_ask_for_the_true_class_and_are_not_offered_it():
    with pytest.raises(attr.ExplainError, match="needs true labels"):
        attr.resolve_target("true", datasets.CLASS_NAMES, labels_known=False)
    with pytest.raises(attr.ExplainError) as err:
        attr.resolve_target("tumour", datasets.CLASS_NAMES, labels_known=False)
    assert "'true'" not in str(err.value) and "'pred'" in str(err.value)


def test_multi_label_data_cannot_ask_for_the_true_class_but_can_name_a_label():
    names = datasets.class_names_of("chestmnist")
    with pytest.raises(attr.ExplainError, match="multi-label"):
        attr.resolve_target("true", names, multi_label=True)
    assert attr.resolve_target("pneumonia", names, multi_label=True) == names.index("pneumonia")


def test_relative_completeness_error_is_delta_over_the_gap():
    assert attr.relative_completeness_error(np.array([0.1, -0.3]), np.array([2.0, -1.5])) == pytest.approx([0.05, 0.2])
    assert np.isfinite(attr.relative_completeness_error(np.array([0.0]), np.array([0.0]))).all()


# ----------------------------------------------------------------------------- every method's record

def test_every_method_and_control_states_every_trait_with_a_known_value():
    import dataclasses

    import quality
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(attr.Method))  # none can be left out
    for m in [*attr.METHODS.values(), *quality.CONTROLS.values(), quality.smoothgrad_method(2, 0.1)]:
        assert callable(m.explain) and m.family in attr.FAMILIES and m.complete in attr.COMPLETENESS, m.name
        assert isinstance(m.needs_references, bool), m.name
        assert m.baseline in (None, "run", *attr.BASELINES) and m.output in (None, *attr.OUTPUTS), m.name


def test_a_methods_settings_are_the_runs_with_its_own_baseline_and_output():
    run = {**attr.DEFAULT_IG, "baseline": "white"}
    assert attr.METHODS["ig"].own_ig_settings(run) == run and attr.METHODS["saliency"].own_ig_settings(run) == run
    assert attr.METHODS["ig_black"].own_ig_settings(run) == {**run, "baseline": "black"}
    assert attr.METHODS["ig_prob"].own_ig_settings(run) == {**run, "attribute": "prob"}


def test_a_method_that_needs_training_images_refuses_to_run_without_them():
    needs = [m for m in attr.METHODS.values() if m.needs_references]
    assert [m.name for m in needs] == ["expected_gradients"]
    with pytest.raises(attr.ExplainError, match="training images"):
        attr.explainer("expected_gradients", attr.DEFAULT_IG)
