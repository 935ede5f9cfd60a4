"""budget.py: every pass over a split takes its images a byte budget at a time, at any image size."""
import math

import pytest
import torch

import attribution as attr
import budget
import engine
import model as model_lib
from data import Split

SIZE = 64  # values an image: 12,288


def forward_rows(monkeypatch, work_bytes, run):
    """Run `run` with WORK_BYTES set to `work_bytes`; the most images any TissueCNN forward took at once."""
    monkeypatch.setattr(budget, "WORK_BYTES", work_bytes)
    seen = []

    def record(module, inputs):
        if isinstance(module, model_lib.TissueCNN):
            seen.append(len(inputs[0]))
    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        result = run()
    finally:
        hook.remove()
    return max(seen), result


def split(n):
    gen = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen),
                 torch.randint(0, 9, (n,), generator=gen))


def test_activations_of_one_image_are_counted_from_the_layers_own_outputs():
    net = model_lib.build()
    largest, total = budget.activations(net, (3, SIZE, SIZE))
    outputs = [math.prod(shape) for _, shape, _, _ in model_lib.layer_costs(net, SIZE)[:-1]]
    assert total == sum(outputs)  # worked out by torch's flop counter's hooks, not budget's
    assert max(outputs) < largest <= 2 * max(outputs)


def test_measuring_activations_leaves_batchnorm_and_training_mode_as_they_were():
    net = model_lib.build().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    budget.activations(net, (3, SIZE, SIZE))
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_predictions_take_a_budget_of_images_at_a_time_and_answer_the_same(monkeypatch):
    net = model_lib.build().eval()
    images = split(96).images
    rows, logits = forward_rows(monkeypatch, 4 << 20, lambda: model_lib.predict_logits(net, images, batch_size=512))
    assert rows < 96 and rows * 4 * budget.activations(net, images.shape[1:])[0] <= 4 << 20
    assert torch.allclose(logits, model_lib.predict_logits(net, images, batch_size=7), atol=1e-5)


def test_validation_and_tta_never_see_the_whole_split_at_once(monkeypatch):
    net, val = model_lib.build(), split(96)
    rows, (loss, acc) = forward_rows(monkeypatch, 4 << 20, lambda: engine.evaluate_split(net, val, 128, "cpu"))
    assert rows < 96 and math.isfinite(loss) and 0 <= acc <= 1
    rows, _ = forward_rows(monkeypatch, 4 << 20, lambda: model_lib.predict_logits(net, val.images, tta=True))
    assert rows < 96


def test_ig_blocks_and_captum_chunks_shrink_to_the_budget_but_never_below_one_image_each():
    net = model_lib.build().eval()
    shape = (3, SIZE, SIZE)
    row = budget.grad_row_bytes(net, shape)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(budget, "WORK_BYTES", 20 * row)
        assert budget.grad_images(net, shape, 32, rows=8) == 2  # 2 images x 8 steps fit 20 rows
        assert budget.grad_images(net, shape, 32, rows=64) == 1  # one image, however many steps
        assert attr.chunk_size(net, torch.zeros(2, *shape)) == 20  # Captum's rows: the budget's
        assert attr.chunk_size(net, torch.zeros(30, *shape)) == 30  # never fewer rows than examples
        assert budget.grad_images(net, shape, 32, rows=8, device="cuda") == 32  # GPU memory: as asked
    rows, row = attr.chunk_size(net, torch.zeros(2, 3, 28, 28)), budget.grad_row_bytes(net, (3, 28, 28))
    assert rows < attr.CPU_CHUNK and rows * row <= budget.WORK_BYTES < (rows + 1) * row  # 28 px: the budget


def test_ig_maps_are_the_same_whatever_the_budget_chunks(monkeypatch):
    net = model_lib.build().eval()
    x = split(3).images.float() / 255
    target = torch.tensor([0, 4, 8])
    settings = {"baseline": "mean", "n_steps": 8, "rule": "gausslegendre", "attribute": "logit"}
    whole = attr.integrated_gradients(net, x, target, settings, internal_batch_size=24).attributions
    rows, parts = forward_rows(monkeypatch, 5 * budget.grad_row_bytes(net, x.shape[1:]),
                               lambda: attr.integrated_gradients(net, x, target, settings,
                                                     internal_batch_size=attr.chunk_size(net, x)).attributions)
    assert rows <= 5 and torch.allclose(parts, whole, atol=1e-6)


def test_a_whole_train_and_evaluate_run_never_hands_the_model_a_whole_split(monkeypatch, tmp_path, train_argv, threads):
    import datasets
    import evaluate
    import synthetic
    import train
    data_dir = tmp_path / "data"
    synthetic.write_synthetic(data_dir / datasets.synthetic_file_name(SIZE), SIZE,
                              counts={"train": 64, "val": 96, "test": 96})
    run = tmp_path / "run"

    def both():
        train.main(train_argv(data_dir, run, "--size", str(SIZE), "--epochs", "1", "--batch-size", "16"))
        return evaluate.main(["--checkpoint", str(run / "best.pt"), "--data-dir", str(data_dir), "--explain", "6",
                              "--quality", "0", "--methods", "ig,saliency", "--explain-errors", "0",
                              "--threads", threads])
    rows, metrics = forward_rows(monkeypatch, 4 << 20, both)  # 4 MB: about 10 images' predictions at 64 px
    assert rows < 96 and metrics["effective"]["explain"] == 6  # validation, test, TTA: in parts
