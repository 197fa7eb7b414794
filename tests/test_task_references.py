"""Training tasks and the tokenizer's input against values computed by hand here: the pixel-regression target of
`beitv2 pretrain --model.target pixels`, the tokenizer validation metrics, VQ-KD's ``input_norm: imagenet``.

The tasks are built the way the commands build them (`build_target` + `MIMTask`, `build_task`), so a refactor of the
task classes only changes the construction helpers below. The references never call the library function they check."""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import pytest
import torch

from beitv2.checkpoint import save_model
from beitv2.commands.pretrain import PretrainConfig
from beitv2.commands.train_tokenizer import TrainTokenizerConfig, build_task
from beitv2.config import from_dict
from beitv2.mim_targets import TokenTarget, build_target
from beitv2.models.backbone import BEiTViT, ViTConfig
from beitv2.models.mim import BEiTv2ForMIM, MIMConfig
from beitv2.tasks import MIMTask
from beitv2.teachers import TeacherConfig

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


def test_task_forward_runs_the_module_the_trainer_wrapped():
    """The trainer hands the task its DDP / compiled wrapper through `wrap`; the forward must run that module (a bare
    model would skip DDP's gradient all-reduce), and `unwrapped()` (validation) the bare model. A second model with
    other head weights stands in for the wrapper, so the loss shows which module ran."""
    task, model = pixel_task(True, False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(3.0)
    batch = pixel_batch()
    labels = pixel_labels_by_hand(batch["image"], batch["mask"], True)
    flat = batch["mask"].reshape(2, -1)
    with torch.no_grad():
        own = float(((model(batch["image"], flat)[0] - labels) ** 2).mean())
        wrapped = float(((other(batch["image"], flat)[0] - labels) ** 2).mean())
        assert abs(own - wrapped) > 1e-2
        task.wrap(other)
        assert float(task(batch)[0]) == pytest.approx(wrapped, rel=1e-5)
        with task.unwrapped():
            assert float(task(batch)[0]) == pytest.approx(own, rel=1e-5)
        assert float(task(batch)[0]) == pytest.approx(wrapped, rel=1e-5)


# ------------------------------------------------------------------------------------- tokenizer validation

NUM_CODES, BETA = 16, 0.5


def write_teacher(folder: Path) -> Path:
    """A tiny 'vit' checkpoint made by this project: the VQ-KD teacher (24-d patch features)."""
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=(16,), patch_size=4, embed_dim=24, depth=1, num_heads=2, use_mean_pooling=True,
                    init_std=0.3)
    return save_model(folder / "teacher.safetensors", BEiTViT(cfg), "vit", cfg)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    return write_teacher(tmp_path_factory.mktemp("teacher"))


def tokenizer_task(teacher_path: Path, input_norm: str = "default"):
    """The VQ-KD task as `beitv2 train-tokenizer` builds it."""
    torch.manual_seed(0)
    cfg = from_dict(TrainTokenizerConfig, {
        "tokenizer": {"vqkd": {"encoder": {"img_size": [16], "patch_size": 4, "embed_dim": 32, "depth": 1,
                                           "num_heads": 2},
                               "decoder_depth": 1, "teacher_dim": 24, "input_norm": input_norm,
                               "quantizer": {"num_codes": NUM_CODES, "code_dim": 8, "beta": BETA}}},
        "teacher": {"kind": "beitv2", "name_or_path": str(teacher_path), "bf16": False}})
    return build_task(cfg)


def trained_tokenizer_task(teacher_path: Path):
    """The task after one training step (k-means init, one EMA update, training-time usage counts)."""
    task = tokenizer_task(teacher_path).train()
    task({"tokenizer_image": torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(11))})
    return task.eval()


def val_batches() -> list[torch.Tensor]:
    """Three validation batches of different sizes and content (so an unweighted mean of batch means differs)."""
    g = torch.Generator().manual_seed(12)
    return [torch.rand(3, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g) ** 3,
            torch.rand(1, 3, 16, 16, generator=g) * 0.5]


def val_loader(batches: list[torch.Tensor]) -> list[dict]:
    """As `collate_skip_bad` yields them: a skip count beside the images, and an all-unreadable batch."""
    out: list[dict] = [{"tokenizer_image": batches[0].clone(), "num_skipped": 1}, {"num_skipped": 2}]
    return out + [{"tokenizer_image": b.clone()} for b in batches[1:]]


@torch.no_grad()
def tokenizer_metrics_by_hand(task, images: torch.Tensor) -> dict[str, float]:
    """Validation metrics over all ``images`` from their definitions: the cosine of the decoder's output for the
    codes `tokenize` returns against the teacher's features, per patch; the commitment term beta * mse(z_q, z) on
    unit vectors; the usage histogram of those codes and its perplexity exp(entropy)."""
    vq = task.model
    teacher = task.teacher(images)
    codes = vq.tokenize(images)
    z = vq.encode(images)
    z = z / z.norm(dim=-1, keepdim=True)
    z_q = vq.quantize.codebook[codes]
    dec = vq.decode(z_q)
    cos = (dec * teacher).sum(-1) / (dec.norm(dim=-1) * teacher.norm(dim=-1))
    quant = BETA * ((z_q - z) ** 2).mean()
    hist = torch.bincount(codes.flatten(), minlength=NUM_CODES).double()
    p = hist[hist > 0] / hist.sum()
    used = int((hist > 0).sum())
    return {"teacher_cos": float(cos.mean()), "rec_loss": float((1 - cos).mean()), "quant_loss": float(quant),
            "loss": float((1 - cos).mean() + quant), "codebook_codes_used": used,
            "codebook_dead_codes": NUM_CODES - used, "codebook_usage": used / NUM_CODES,
            "codebook_perplexity": math.exp(float(-(p * p.log()).sum())), "images": images.shape[0]}


def perplexity(counts: torch.Tensor) -> float:
    p = counts[counts > 0].double() / counts.sum()
    return math.exp(float(-(p * p.log()).sum()))


def assert_metrics(got: dict, want: dict) -> None:
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_tasks_keep_their_frozen_helpers_in_eval_mode_without_gradients(teacher_path):
    task = tokenizer_task(teacher_path)
    assert not task.teacher.training and not any(p.requires_grad for p in task.teacher.parameters())
    task.train()
    assert task.model.training and not task.teacher.training
    assert all(p.requires_grad for p in task.model.parameters() if p is not task.model.quantize.codebook)
    # a tokenizer handed over in training mode is frozen by the MIM task itself
    tokenizer = tokenizer_task(teacher_path).model.train()
    mim = MIMTask(BEiTv2ForMIM(MIMConfig(backbone=ViTConfig(img_size=(16,), patch_size=4, embed_dim=32, depth=1,
                                                            num_heads=2), vocab_size=NUM_CODES, early_layers=1,
                                         head_layers=1)), TokenTarget(tokenizer))
    assert not tokenizer.training and not any(p.requires_grad for p in tokenizer.parameters())
    mim.train()
    assert mim.model.training and not tokenizer.training


def test_tokenizer_evaluate_metrics_by_hand_and_training_usage_restored(teacher_path):
    task = trained_tokenizer_task(teacher_path)
    q = task.model.quantize
    saved, codebook, ema = q.usage_counts.clone(), q.codebook.detach().clone(), q.cluster_size.clone()
    assert saved.sum() == 4 * 16  # the training step's assignments
    batches = val_batches()
    out = task.evaluate(val_loader(batches), torch.device("cpu"), contextlib.nullcontext)
    want = tokenizer_metrics_by_hand(task, torch.cat(batches))
    assert_metrics(out, want)
    assert out["codebook_ema_dead_codes"] == task.epoch_metrics()["codebook_ema_dead_codes"]
    # training-time usage counts, the codebook and its EMA statistics are as before the validation pass
    assert torch.equal(q.usage_counts, saved)
    assert torch.equal(q.codebook, codebook) and torch.equal(q.cluster_size, ema)
    # preconditions: what a bug would report instead differs from the reference beyond the tolerance
    codes = torch.cat([task.model.tokenize(b).flatten() for b in batches])
    hist = torch.bincount(codes, minlength=NUM_CODES).double()
    assert 1 < want["codebook_codes_used"] < NUM_CODES
    assert abs(perplexity(hist + saved) - want["codebook_perplexity"]) > 1e-2  # counts not reset before the pass
    assert abs(perplexity(hist[:-1]) - want["codebook_perplexity"]) > 1e-3 or hist[-1] == 0
    per_batch = [tokenizer_metrics_by_hand(task, b) for b in batches]
    unweighted = sum(m["rec_loss"] for m in per_batch) / len(per_batch)
    assert abs(unweighted - want["rec_loss"]) > 1e-4  # a mean of batch means is not the mean over images
    assert abs(want["quant_loss"]) > 1e-3 and abs(want["teacher_cos"]) > 1e-3


# ------------------------------------------------------------------------------------- VQ-KD input_norm

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def encoder_input(vq, images: torch.Tensor) -> torch.Tensor:
    """What the encoder's patch embedding receives for ``images`` (read by a forward pre-hook)."""
    seen = []
    handle = vq.encoder.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            vq.tokenize(images)
    finally:
        handle.remove()
    (x,) = seen
    return x


@pytest.mark.parametrize("input_norm", ["imagenet", "default"])
def test_vqkd_input_norm_is_what_the_encoder_sees(teacher_path, input_norm):
    vq = tokenizer_task(teacher_path, input_norm).model.eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(13))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    want = (images - mean) / std if input_norm == "imagenet" else images * 2 - 1
    torch.testing.assert_close(encoder_input(vq, images), want, rtol=1e-6, atol=1e-6)
    # preconditions: swapped mean / std, the channels' statistics reversed, or the other mapping all differ
    wrong = [(images - std) / mean, (images - mean.flip(1)) / std.flip(1), images]
    wrong.append(images * 2 - 1 if input_norm == "imagenet" else (images - mean) / std)
    for other in wrong:
        assert (other - want).abs().max() > 0.1
    if input_norm == "imagenet":  # same encoding as the default mapping fed the image that maps to the same input
        default = tokenizer_task(teacher_path, "default").model.eval()
        default.load_state_dict(vq.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(vq.encode(images), default.encode(((images - mean) / std + 1) / 2),
                                       rtol=1e-5, atol=1e-5)
