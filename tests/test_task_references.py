"""Training tasks and the tokenizer's input against values computed by hand here: the pixel-regression target of
`beitv2 pretrain --model.target pixels`, the tokenizer validation metrics, VQ-KD's ``input_norm: imagenet``.

The tasks are built the way the commands build them (`build_target` + `MIMTask`, `build_task`), so a refactor of the
task classes only changes the construction helpers below. The references never call the library function they check."""

from __future__ import annotations

import math

import pytest
import torch

from beitv2.commands.pretrain import PretrainConfig
from beitv2.mim_targets import build_target
from beitv2.models.backbone import ViTConfig
from beitv2.models.mim import BEiTv2ForMIM, MIMConfig
from beitv2.tasks import MIMTask
from beitv2.teachers import TeacherConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# ------------------------------------------------------------------------------------------------ pixel target

P = 4
GRID = (4, 3)  # non-square, so a swapped height / width changes the patch order


def pixel_task(norm_pix_loss: bool, aggregation: bool):
    """(task, model) as `beitv2 pretrain --model.target pixels` builds them."""
    torch.manual_seed(0)
    b = ViTConfig(img_size=(GRID[0] * P, GRID[1] * P), patch_size=P, embed_dim=32, depth=2, num_heads=2,
                  init_values=0.5, init_std=0.3)  # large weights: predictions far from zero and from each other
    cfg = MIMConfig(backbone=b, target="pixels", norm_pix_loss=norm_pix_loss, patch_aggregation=aggregation,
                    early_layers=1, head_layers=1)
    target = build_target(PretrainConfig(model=cfg, teacher=TeacherConfig()))
    model = BEiTv2ForMIM(cfg)
    with torch.no_grad():  # masked patches all enter as the mask token: random position biases set them apart
        for name, t in model.named_parameters():
            if "relative_position_bias_table" in name:
                t.normal_(0, 2.0)
    return MIMTask(model, target).eval(), model


def pixel_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    image = torch.randn(2, 3, GRID[0] * P, GRID[1] * P, generator=g) * 0.8 + 0.1
    # a nearly flat masked patch (variance ~1e-6): there the eps placement (sqrt(var + 1e-6)) decides the target
    image[0, :, 0:P, P:2 * P] = 0.3 + 1e-3 * torch.randn(3, P, P, generator=g)
    mask = torch.zeros(2, *GRID, dtype=torch.bool)  # asymmetric and different per sample; its transpose differs
    mask[0, 0, 1:3] = True
    mask[0, 2, 0] = True
    mask[0, 3, 2] = True
    mask[1, 1:4, 1] = True
    mask[1, 0, 0] = True
    return {"image": image, "tokenizer_image": torch.rand(2, 3, GRID[0] * P, GRID[1] * P, generator=g), "mask": mask}


def pixel_labels_by_hand(images, mask, normalize: bool, *, order: str = "row", pixel_order: str = "hwc",
                         unbiased: bool = True, eps_inside: bool = True) -> torch.Tensor:
    """MAE / BEiT pixel targets written out: the masked patches in row-major order, each flattened as (row, column,
    channel) and, when normalising, standardised over its own pixels with the unbiased variance, (var + 1e-6) ** .5.
    The keyword options build the variants a bug would give (preconditions of the test)."""
    B, C, H, W = images.shape
    rows = []
    for b in range(B):
        cells = [(r, c) for r in range(H // P) for c in range(W // P)]
        if order == "col":
            cells = [(r, c) for c in range(W // P) for r in range(H // P)]
        for r, c in cells:
            if not mask[b, r, c]:
                continue
            patch = images[b, :, r * P:(r + 1) * P, c * P:(c + 1) * P].double()
            v = patch.permute(1, 2, 0).reshape(-1) if pixel_order == "hwc" else patch.reshape(-1)
            if normalize:
                n = v.numel()
                mean = v.sum() / n
                var = ((v - mean) ** 2).sum() / (n - 1 if unbiased else n)
                v = (v - mean) / (math.sqrt(var + 1e-6) if eps_inside else math.sqrt(var) + 1e-6)
            rows.append(v)
    return torch.stack(rows).float()


@pytest.mark.parametrize("norm_pix_loss,aggregation", [(True, True), (True, False), (False, True)])
def test_pixel_target_labels_and_loss_by_hand(norm_pix_loss, aggregation):
    task, model = pixel_task(norm_pix_loss, aggregation)
    batch = pixel_batch()
    images, mask = batch["image"], batch["mask"]
    labels = pixel_labels_by_hand(images, mask, norm_pix_loss)
    assert labels.shape == (int(mask.sum()), P * P * 3)
    with torch.no_grad():
        outputs = model(images, mask.reshape(2, -1))
        loss, metrics = task(batch)
    assert len(outputs) == (2 if aggregation else 1)
    per_head = [((out.double() - labels.double()) ** 2).mean() for out in outputs]
    torch.testing.assert_close(loss.double(), sum(per_head), rtol=1e-5, atol=1e-6)
    for i, want in enumerate(per_head, start=1):
        torch.testing.assert_close(metrics[f"loss_{i}"].double(), want, rtol=1e-5, atol=1e-6)
    # preconditions: the labels a plausible bug would give change the loss far beyond the tolerance
    wrong = {"tokenizer view": pixel_labels_by_hand(batch["tokenizer_image"], mask, norm_pix_loss),
             "column-major patches": pixel_labels_by_hand(images, mask, norm_pix_loss, order="col"),
             "(channel, row, column) pixels": pixel_labels_by_hand(images, mask, norm_pix_loss, pixel_order="chw"),
             "normalisation flipped": pixel_labels_by_hand(images, mask, not norm_pix_loss)}
    if norm_pix_loss:
        wrong["biased variance"] = pixel_labels_by_hand(images, mask, True, unbiased=False)
        wrong["eps outside the sqrt"] = pixel_labels_by_hand(images, mask, True, eps_inside=False)
    for name, other in wrong.items():
        assert abs(float(((outputs[0] - other) ** 2).mean()) - float(per_head[0])) > 1e-3, name


def test_pixel_target_gradient_reaches_the_model_through_the_mse():
    """d loss / d prediction = 2 (prediction - label) / numel for each head: the task's loss is the MSE itself (not a
    detached copy, not a mean over patches of per-patch sums)."""
    task, model = pixel_task(True, False)
    batch = pixel_batch()
    labels = pixel_labels_by_hand(batch["image"], batch["mask"], True)
    grads = []

    def keep_grad(module, inputs, out):
        out.register_hook(grads.append)

    handle = model.lm_head.register_forward_hook(keep_grad)
    try:
        loss, _ = task(batch)
        loss.backward()
    finally:
        handle.remove()
    with torch.no_grad():
        (out,) = model(batch["image"], batch["mask"].reshape(2, -1))
    (g,) = grads
    torch.testing.assert_close(g, 2 * (out - labels) / labels.numel(), rtol=1e-4, atol=1e-6)
