"""budget.py: how many images a pass over a split takes at once, by bytes, not by image count.

    chunk = budget.chunk_images(images, 20)                    # statistics: 20 bytes a pixel value
    batch = budget.forward_batch(net, images.shape[1:], 512, device)   # predictions, validation, TTA
    block = budget.grad_images(net, images.shape[1:], 32, device=device)  # IG: Captum chunks the steps
    rows = budget.grad_rows(net, x, at_least=len(x))             # Captum's internal_batch_size

One budget, WORK_BYTES of working memory, at every image size: a CPU batch of 512 predictions holds 35 MB
at 28 px and 2.3 GB at 224 px, so a count that suits one size breaks another. A model's bytes per
image come from its own activations (one hooked forward of one image, cached per model and shape).
On a GPU the activations live in the GPU's memory, so batches there stay as asked.
"""
import itertools
import math
import weakref

WORK_BYTES = 128 << 20  # working memory of one chunk of a pass over a split, at any image size
FLOAT = 4  # bytes of a float32 value
_ACTIVATIONS = weakref.WeakKeyDictionary()  # model -> {image shape: (largest in+out, sum of outputs)}


def chunk_images(images, bytes_per_value):
    """Images per chunk so that a chunk's float working copies (`bytes_per_value` per pixel value)
    stay within WORK_BYTES: 8,192 images at 28 px is 0.4 GB in float64, at 224 px 25 GB."""
    return max(1, WORK_BYTES // (bytes_per_value * max(1, images[0].numel()))) if len(images) else 1


def activations(model, shape):
    """(largest input + output of one layer, sum of every layer's output), in values, for one image
    of `shape` (C, H, W): what a forward holds at once without gradients, and what a backward keeps."""
    import torch  # here, not at the top: slide.py's ONNX path sizes its batches without torch
    shape = tuple(int(s) for s in shape)
    known = _ACTIVATIONS.setdefault(model, {})
    if shape not in known:
        sizes = []

        def record(module, inputs, output):
            if isinstance(output, torch.Tensor):
                sizes.append((sum(t.numel() for t in inputs if isinstance(t, torch.Tensor)), output.numel()))
        model = getattr(model, "module", model)  # DistributedDataParallel's model, not the wrapper
        model = getattr(model, "_orig_mod", model)  # torch.compile's, not its compiled wrapper
        leaves = [m for m in model.modules() if not list(m.children())]
        modes = [m.training for m in model.modules()]
        hooks = [m.register_forward_hook(record) for m in leaves]
        try:
            model.eval()  # BatchNorm's running statistics and dropout untouched
            with torch.no_grad():
                like = next(itertools.chain(model.parameters(), model.buffers()), torch.zeros(()))
                model(torch.zeros(1, *shape, device=like.device, dtype=like.dtype))
        finally:
            for h in hooks:
                h.remove()
            for m, mode in zip(model.modules(), modes, strict=True):
                m.training = mode
        pixels = math.prod(shape)  # a model of no recorded layers holds its input at least
        known[shape] = (max([i + o for i, o in sizes], default=pixels), sum(o for _, o in sizes) or pixels)
    return known[shape]


def on_gpu(device):
    import torch
    return torch.device(device).type == "cuda"


def tile_batch(tile_bytes, requested):
    """Slide tiles per batch: at most `requested`, as many as WORK_BYTES holds of tiles as read
    (`tile_bytes` each: a tile read at level 0 of a 0.25 um/px slide is 448 x 448 RGBA, 0.8 MB)."""
    return max(1, min(requested, WORK_BYTES // max(1, tile_bytes)))


def forward_batch(model, shape, requested, device="cpu", copies=1):
    """Images per batch of a forward pass without gradients (predictions, validation, TTA with
    `copies` inputs alive at once): at most `requested`, within WORK_BYTES on the CPU."""
    if on_gpu(device):
        return requested
    largest, _ = activations(model, shape)
    per_image = FLOAT * (largest + (1 + copies) * math.prod(shape))
    return max(1, min(requested, WORK_BYTES // per_image))


def grad_row_bytes(model, shape):
    """Bytes one input row costs in a forward and backward pass: its activations kept, their gradients."""
    _, total = activations(model, shape)
    return FLOAT * (2 * total + 2 * math.prod(shape))


def grad_images(model, shape, requested, rows=1, device="cpu"):
    """Images per block of a pass with gradients that expands each image into `rows` inputs (IG's
    steps): at most `requested`, within WORK_BYTES on the CPU, and never below one image."""
    if on_gpu(device):
        return requested
    return max(1, min(requested, WORK_BYTES // (rows * grad_row_bytes(model, shape))))


def grad_rows(model, x, at_least):
    """Captum's internal_batch_size for inputs `x`: as many expanded rows as WORK_BYTES holds, never
    below `at_least` (Captum refuses fewer rows than examples)."""
    return max(at_least, WORK_BYTES // grad_row_bytes(model, x.shape[1:]))
