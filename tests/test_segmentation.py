"""Semantic segmentation: the UperNet segmenter, its data, metrics, inference, training command and HF round trip."""

import json
import math

import numpy as np
import pytest
import torch
from builders import tiny_seg_vit, tiny_segmenter
from PIL import Image

from beitv2.checkpoint import save_model
from beitv2.cli import main as cli_main
from beitv2.data.segmentation import (
    ADE20K_CLASSES,
    IGNORE_INDEX,
    FashionMNISTSegmentation,
    IterationEpochs,
    SegmentationFolder,
    SegmentationSamples,
    collate_segmentation,
    reduce_zero_label,
)
from beitv2.data.segmentation_transforms import CatMaxRatioCrop, SegmentationAugConfig, SegmentationTrainTransform
from beitv2.engine.schedule import poly_schedule
from beitv2.eval.segmentation import confusion_matrix, metrics_from_confusion, slide_inference, whole_inference
from beitv2.eval.segmentation_training import SegmentationModelConfig, build_segmenter
from beitv2.models.backbone import BEiTViT, ViTConfig
from beitv2.models.mim import BEiTv2ForMIM, MIMConfig
from beitv2.models.relpos import resize_rel_pos_table
from beitv2.models.segmenter import SegmenterConfig, layer_id_for_segmenter


def test_pyramid_shapes_and_logits():
    m = tiny_segmenter(seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = m.features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4), (2, 16, 2, 2)]
    assert m.config.indices == (1, 2, 3, 4)
    logits, aux = m(x, return_aux=True)
    assert logits.shape == (2, 5, 16, 16) and aux.shape == (2, 5, 4, 4)  # stride p/4 and the third level (p)
    # the pyramid taps block outputs without the final norm: level 3 is block 3's patch tokens as a map
    t = m.backbone.embed(x)
    for blk in m.backbone.blocks[:3]:
        t = blk(t)
    torch.testing.assert_close(feats[2], t[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4))


def test_official_out_indices_and_config_errors():
    from beitv2.config import ConfigError

    assert SegmenterConfig(backbone=tiny_seg_vit(depth=12)).indices == (4, 6, 8, 12)
    assert SegmenterConfig(backbone=tiny_seg_vit(depth=24)).indices == (8, 12, 16, 24)
    with pytest.raises(ConfigError, match="out_indices"):
        SegmenterConfig(backbone=tiny_seg_vit(), out_indices=(1, 2, 3)).validate()
    with pytest.raises(ConfigError, match=r"0\.\.4"):
        SegmenterConfig(backbone=tiny_seg_vit(), out_indices=(1, 2, 3, 5)).validate()
    with pytest.raises(ConfigError, match="non-decreasing"):
        SegmenterConfig(backbone=tiny_seg_vit(), out_indices=(3, 2, 1, 0)).validate()
    SegmenterConfig(backbone=tiny_seg_vit(), out_indices=(0, 1, 2, 2)).validate()  # the patch embedding, a repeat


def test_taps_short_of_the_last_block_leave_later_blocks_unrun():
    m = tiny_segmenter(seed=0, out_indices=(0, 1, 2, 2)).eval()
    x = torch.randn(1, 3, 32, 32)
    calls = []
    for i, blk in enumerate(m.backbone.blocks):
        blk.register_forward_hook(lambda mod, inp, out, i=i: calls.append(i))
    with torch.no_grad():
        feats = m.features(x)
        assert calls == [0, 1]  # blocks 3 and 4 feed no level
        emb = m.backbone.embed(x)  # level 1 is the patch embedding (block 0), level 3 block 2's output
        torch.testing.assert_close(m.fpn1(emb[:, 1:].transpose(1, 2).reshape(1, 16, 4, 4)), feats[0])
        t = m.backbone.blocks[1](m.backbone.blocks[0](emb))
        torch.testing.assert_close(feats[2], t[:, 1:].transpose(1, 2).reshape(1, 16, 4, 4))


def test_layer_decay_ids():
    m = tiny_segmenter(seed=0)
    ids = {n: layer_id_for_segmenter(n, 4) for n, _ in m.named_parameters()}
    assert ids["backbone.cls_token"] == 0 and ids["backbone.patch_embed.proj.weight"] == 0
    assert ids["backbone.blocks.0.attn.qkv.weight"] == 1 and ids["backbone.blocks.3.mlp.fc2.bias"] == 4
    assert ids["backbone.blocks.2.attn.relative_position_bias_table"] == 3
    assert ids["fpn1.0.weight"] == 5 and ids["decode_head.classifier.weight"] == 5
    assert ids["auxiliary_head.convs.0.conv.weight"] == 5
    from beitv2.engine import OptimConfig, param_groups

    groups = param_groups(m, OptimConfig(layer_decay=0.5), lambda n: layer_id_for_segmenter(n, 4), 6)
    scale = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scale[0] == 0.5 ** 5 and scale[1] == 0.5 ** 4 and scale[5] == 1.0


def test_shared_table_becomes_resized_per_block_tables(tmp_path):
    torch.manual_seed(0)
    mim = BEiTv2ForMIM(MIMConfig(backbone=ViTConfig(img_size=(16,), patch_size=8, embed_dim=16, depth=4, num_heads=2),
                                 vocab_size=8, early_layers=2, head_layers=1))
    with torch.no_grad():
        mim.rel_pos_bias.relative_position_bias_table.normal_()
    path = save_model(tmp_path / "mim.safetensors", mim, "mim")
    spec = SegmentationModelConfig(checkpoint=str(path), img_size=(32,), auxiliary_channels=8)
    model, report = build_segmenter(spec, 3)
    shared = mim.rel_pos_bias.relative_position_bias_table.detach()
    expected = resize_rel_pos_table(shared, (2, 2), (4, 4))  # the official geometric remap, 2x2 -> 4x4 grid
    assert model.backbone.rel_pos_bias is None
    for blk in model.backbone.blocks:
        torch.testing.assert_close(blk.attn.relative_position_bias_table.detach(), expected)
    torch.testing.assert_close(model.backbone.blocks[1].mlp.fc1.weight, mim.blocks[1].mlp.fc1.weight)
    assert report["img_size"] == [32, 32] and report["src_img_size"] == [16, 16]


def test_confusion_matrix_and_miou_by_hand():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = confusion_matrix(pred, label, 4)
    # rows gt, cols pred; the 255 pixel is ignored; class 3 neither present nor predicted
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = metrics_from_confusion(cm)
    iou = [1 / 3, 2 / 4, 1 / 3]  # tp / (gt + pred - tp): 1/(2+2-1), 2/(3+3-2), 1/(2+2-1)
    acc = [1 / 2, 2 / 3, 1 / 2]
    assert m["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert m["mAcc"] == pytest.approx(100 * sum(acc) / 3)
    assert m["aAcc"] == pytest.approx(100 * 4 / 7)
    assert math.isnan(m["IoU"][3]) and m["IoU"][1] == pytest.approx(50.0)
    # a class predicted but absent from the ground truth counts with IoU 0: mean of 1/2 (class 0) and 0 (class 3)
    m2 = metrics_from_confusion(confusion_matrix(torch.tensor([3, 0]), torch.tensor([0, 0]), 4))
    assert m2["IoU"][3] == 0.0 and m2["mIoU"] == pytest.approx(25.0) and math.isnan(m2["IoU"][1])


def test_sliding_window_equals_whole_image():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 1)  # a per-pixel model: every window agrees with the whole image
    x = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        whole = whole_inference(conv, x)
        slid = slide_inference(conv, x, 4, (16, 24), (11, 13))
    torch.testing.assert_close(slid, whole)
    m = tiny_segmenter(seed=0).eval()  # one window covering the image: the real segmenter agrees exactly
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(slide_inference(m, x, 5, (32, 32), (21, 21)), whole_inference(m, x, (32, 32)))


def test_a_few_steps_lower_the_loss():
    from beitv2.engine import OptimConfig, build_optimizer, set_schedule

    m = tiny_segmenter(seed=0)
    m.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    y = torch.ones(4, 32, 32, dtype=torch.long)  # a learnable layout: left class 1, right class 2, top ignored
    y[:, :, 16:] = 2
    y[:, :4] = IGNORE_INDEX
    opt = build_optimizer(m, OptimConfig(lr=1e-2, layer_decay=0.75), num_layers=6,
                          layer_id_fn=lambda n: layer_id_for_segmenter(n, 4))
    lrs = poly_schedule(1e-2, 0.0, 8, warmup_steps=2, warmup_ratio=1e-6)
    losses = []
    for step in range(8):
        set_schedule(opt, float(lrs[step]), 0.05)
        loss, metrics = m.loss(*m(x, return_aux=True), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert set(metrics) == {"decode_loss", "aux_loss"}
    assert losses[-1] < losses[0] - 0.15


def test_poly_schedule_official_warmup():
    s = poly_schedule(1.0, 0.0, 100, warmup_steps=10, power=1.0, warmup_ratio=1e-6)
    assert s[0] == pytest.approx(1e-6) and s[0] > 0  # lr > 0 from the first step (mmcv)
    assert s[5] == pytest.approx((1 - 5 / 100) * (1 - 0.5 * (1 - 1e-6)))
    assert s[50] == pytest.approx(0.5) and s[99] == pytest.approx(0.01)


def test_fmnist_composition_is_seeded_and_labelled():
    ds = FashionMNISTSegmentation(train=False, size=4, canvas=56, seed=3)
    img, mask = ds[1]
    img2, mask2 = FashionMNISTSegmentation(train=False, size=4, canvas=56, seed=3)[1]
    assert np.array_equal(np.asarray(img), np.asarray(img2)) and np.array_equal(mask, mask2)
    arr = np.asarray(img)
    assert img.size == (56, 56) and mask.shape == (56, 56)
    assert ((mask > 0) == (arr > 16)).all()  # labelled exactly where an item is visible
    assert set(np.unique(mask)) - {0} <= set(range(1, 11)) and (mask > 0).any()
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[-1] == "flag"


def test_joint_augmentation_keeps_labels_aligned():
    ds = FashionMNISTSegmentation(train=False, size=8, canvas=56, seed=0)
    a = SegmentationAugConfig(scale=(112, 56), test_scale=(112, 56), photometric=False)
    samples = SegmentationSamples(ds, SegmentationTrainTransform(a, (56, 56), 1, "none"), seed=1)
    for i in range(4):
        s = samples[i]
        assert s["image"].shape == (1, 56, 56) and s["mask"].shape == (56, 56)
        img, mask = s["image"][0], s["mask"]
        valid = mask != IGNORE_INDEX  # padding is ignored; elsewhere label > 0 where the (resized) item shows
        fg = (mask > 0) & valid
        assert (img[fg] > 0).float().mean() > 0.9 and (img[(mask == 0) & valid] < 0.2).float().mean() > 0.9
    torch.testing.assert_close(samples[2]["image"], samples[2]["image"])  # seeded: same sample twice
    assert torch.equal(samples[3]["mask"], samples[3]["mask"])
    # cat_max_ratio: a crop where one class covers >= 75% is re-drawn when a better one exists
    from torchvision import tv_tensors

    mask = torch.zeros(1, 40, 40, dtype=torch.uint8)
    mask[0, :, 30:] = 1
    crop = CatMaxRatioCrop((10, 10), 0.75)
    torch.manual_seed(0)
    boxes = [crop.make_params([tv_tensors.Mask(mask)])["box"] for _ in range(20)]
    assert sum(21 <= b[1] <= 29 for b in boxes) > 10  # mostly crops straddling the class border


def test_iteration_epochs_cover_every_image_once_per_pass():
    base = SegmentationSamples(FashionMNISTSegmentation(train=False, size=10, canvas=28, min_items=1, max_items=1),
                               lambda img, m: (torch.zeros(1), torch.zeros(1)))
    it = IterationEpochs(base, 4, seed=0)
    seen = []
    for e in range(5):  # 20 draws = two passes over 10 images
        it.set_epoch(e)
        seen += [it.source_index(i) for i in range(4)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))


def test_bad_masks_reported_and_skipped(tmp_path, caplog):
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    for name in ("a", "b", "c", "d"):
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(imgs / f"{name}.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(masks / "a.png")
    Image.fromarray(np.ones((6, 8), np.uint8)).save(masks / "b.png")  # size mismatch
    (masks / "c.png").write_bytes(b"not a png")  # unreadable
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(masks / "d.png")  # RGB, not class ids
    ds = SegmentationFolder(str(imgs), str(masks), ["x", "y"])
    with caplog.at_level("WARNING", logger="beitv2.data"):
        items = [ds[i] for i in range(4)]
    assert items[0] is not None and items[1:] == [None, None, None]
    bad = dict(ds.bad_files)
    assert set(bad) == {str(masks / "b.png"), str(masks / "c.png"), str(masks / "d.png")}
    assert "differs" in bad[str(masks / "b.png")] and "single-channel" in bad[str(masks / "d.png")]
    assert str(masks / "c.png") in caplog.text
    batch = collate_segmentation([{"image": torch.zeros(1), "mask": torch.zeros(1)}, None])
    assert batch["num_skipped"] == 1 and batch["image"].shape == (1, 1)
    assert reduce_zero_label(np.array([0, 1, 150], np.uint8)).tolist() == [255, 0, 149]


def test_hf_export_refuses_what_transformers_cannot_hold(tmp_path):
    # logit parity at trained scale, import of the published layout and the pipeline: tests/test_seg_interop.py
    from beitv2.interop.hf_segmentation import export_hf_segmentation

    with pytest.raises(ValueError, match="channels"):
        export_hf_segmentation(tiny_segmenter(seed=0, channels=8, out_indices=(0, 1, 2, 3)), tmp_path / "hf2")
    with pytest.raises(ValueError, match=r"cannot read the last block \(4\)"):
        export_hf_segmentation(tiny_segmenter(seed=0), tmp_path / "hf3")  # official taps 1 2 3 4
    with pytest.raises(ValueError, match="3 class names"):
        export_hf_segmentation(tiny_segmenter(seed=0, out_indices=(0, 1, 2, 3)), tmp_path / "hf4", ["a", "b", "c"])
    assert not any(tmp_path.iterdir())


def test_segment_command_trains_resumes_bitwise_and_evaluates(tmp_path):
    torch.manual_seed(0)
    vit = BEiTViT(ViTConfig(img_size=(28,), patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2))
    ck = save_model(tmp_path / "vit.safetensors", vit, "vit")
    common = ["segment", "--preset", "seg_fmnist_cpu", "--model.checkpoint", str(ck), "--model.img_size", "28",
              "--data.fmnist_canvas", "28", "--data.fmnist_items", "1", "1", "--data.fmnist_train_size", "16",
              "--data.fmnist_val_size", "4", "--data.num_workers", "0", "--aug.scale", "56", "28",
              "--aug.test_scale", "56", "28", "--train.batch_size", "4", "--optim.warmup_steps", "2",
              "--optim.lr", "3e-3", "--schedule.iters", "8", "--model.auxiliary_channels", "8",
              "--train.precision", "fp32", "--train.progress", "false", "--train.log_every_steps", "1",
              "--train.tensorboard", "false", "--eval.figure_samples", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli_main(common + ["--train.output_dir", str(full)]) == 0
    assert cli_main(common + ["--train.output_dir", str(part), "--train.stop_after_steps", "3"]) == 0
    assert cli_main(common + ["--train.output_dir", str(part)]) == 0
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise resume
    steps = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["type"] == "step"]
    assert steps[0]["lr"] > 0 and len(steps) == 8  # the poly warmup trains from the first step
    metrics = json.loads((full / "metrics.json").read_text())
    assert 0 <= metrics["mIoU"] <= 100 and len(metrics["per_class"]) == 11
    from beitv2.checkpoint import read_metadata
    from beitv2.data.segmentation import FMNIST_SEG_CLASSES

    meta = read_metadata(full / "model.safetensors")  # what `convert --to hf` writes into id2label / preprocessor
    assert json.loads(meta["class_names"]) == list(FMNIST_SEG_CLASSES) == metrics["classes"]
    assert meta["normalize"] == metrics["normalize"] and meta["reduce_zero_label"] == "false"
    assert (full / "eval_table.md").read_text().count("|") > 40 and (full / "predictions.png").stat().st_size > 0
    # evaluate the trained segmenter file again: the same confusion matrix
    ev = tmp_path / "ev"
    assert cli_main(common + ["--model.checkpoint", str(full / "model.safetensors"), "--evaluate_only", "true",
                              "--train.output_dir", str(ev)]) == 0
    assert json.loads((ev / "metrics.json").read_text())["confusion_matrix"] == metrics["confusion_matrix"]


def test_folder_data_config_names_each_missing_or_absent_folder(tmp_path):
    from beitv2.config import ConfigError
    from beitv2.data.segmentation import SegmentationDataConfig

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    ok = dict(kind="folder", path=str(tmp_path / "img"), mask_path=str(tmp_path / "msk"), num_classes=3)
    SegmentationDataConfig(**ok).validate()
    with pytest.raises(ConfigError, match=r"^data\.mask_path: required with data\.kind folder"):
        SegmentationDataConfig(**{**ok, "mask_path": ""}).validate()
    gone = str(tmp_path / "nowhere")
    for field in ("path", "mask_path"):
        with pytest.raises(ConfigError, match=rf"^data\.{field}: folder not found: {gone}"):
            SegmentationDataConfig(**{**ok, field: gone}).validate()
    with pytest.raises(ConfigError, match=r"^data\.val_path: folder not found"):
        SegmentationDataConfig(**ok, val_path=gone, val_mask_path=str(tmp_path / "msk")).validate()
