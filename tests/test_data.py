"""Image sources, the corrupt-file policy, IDX parsing, WebDataset shards and per-sample determinism."""

from __future__ import annotations

import gzip
import io
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor

from beitv2.config import ConfigError
from beitv2.data import (
    DataConfig,
    FashionMNIST,
    IDXFormatError,
    ImageFolderDataset,
    MIMDataset,
    TokenizerTrainDataset,
    TokenizerTrainTransform,
    TwoViewTransform,
    WebDatasetShards,
    build_dataset,
    collate_skip_bad,
    count_samples,
    for_loader,
    read_idx,
    scan_images,
    stratified_subset,
)
from beitv2.engine.sampler import StreamPlan
from beitv2.masking import build_mask_generator


def _rgb(color, size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, color)


@pytest.fixture()
def mixed_folder(tmp_path):
    """Two classes with one image of each awkward mode, a truncated JPEG and a text file named .png."""
    a, b = tmp_path / "cat", tmp_path / "dog"
    a.mkdir()
    b.mkdir()
    _rgb((10, 20, 30)).save(a / "rgb.jpg", quality=100)
    Image.new("L", (8, 6), 77).save(a / "gray.png")
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black pixel
    rgba.save(a / "rgba.png")
    pal = Image.new("P", (8, 6), 1)
    pal.putpalette([0, 0, 0, 0, 200, 100] + [0] * 762)
    pal.save(b / "pal.png")
    arr16 = np.full((6, 8), 32768, dtype=np.uint16)
    arr16[0, 0] = 65535
    Image.fromarray(arr16).save(b / "deep.png")
    buf = io.BytesIO()
    _rgb((200, 0, 0), (64, 64)).save(buf, format="JPEG")
    (b / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (b / "notes.png").write_text("this is not an image")
    (b / "readme.txt").write_text("ignored: not an image extension")
    (tmp_path / ".hidden").mkdir()
    _rgb((1, 2, 3)).save(tmp_path / ".hidden" / "x.png")
    return tmp_path


def test_folder_modes_classes_and_bad_files(mixed_folder, caplog):
    ds = ImageFolderDataset(mixed_folder)
    assert ds.classes == ["cat", "dog"]
    names = [os.path.basename(f) for f in ds.files]
    assert sorted(names) == sorted(["rgb.jpg", "gray.png", "rgba.png", "pal.png", "deep.png", "truncated.jpg",
                                    "notes.png"])
    by_name = {n: i for i, n in enumerate(names)}
    assert ds[by_name["gray.png"]][1] == 0 and ds[by_name["pal.png"]][1] == 1

    gray, _ = ds[by_name["gray.png"]]
    assert gray.mode == "RGB" and gray.getpixel((3, 3)) == (77, 77, 77)
    rgba, _ = ds[by_name["rgba.png"]]
    assert rgba.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background, not the stored black
    assert rgba.getpixel((1, 1)) == (255, 0, 0)
    assert ds[by_name["pal.png"]][0].getpixel((2, 2)) == (0, 200, 100)
    deep, _ = ds[by_name["deep.png"]]
    assert deep.getpixel((0, 0)) == (255, 255, 255)
    assert deep.getpixel((4, 4)) == (128, 128, 128)  # scaled 32768 * 255 / 65535, not clipped to 255

    with caplog.at_level(logging.WARNING, logger="beitv2.data"):
        assert ds[by_name["truncated.jpg"]] is None
        assert ds[by_name["notes.png"]] is None
    bad = dict(ds.bad_files)
    trunc, notes = str(mixed_folder / "dog" / "truncated.jpg"), str(mixed_folder / "dog" / "notes.png")
    assert set(bad) == {trunc, notes}
    assert "truncated" in bad[trunc].lower()
    assert "UnidentifiedImageError" in bad[notes]
    assert f"skipping unreadable image {notes}: " in caplog.text
    assert f"skipping unreadable image {trunc}: " in caplog.text

    gray1, _ = ImageFolderDataset(mixed_folder, channels=1)[by_name["rgba.png"]]
    assert gray1.mode == "L" and gray1.getpixel((0, 0)) == 255


def test_bad_samples_are_dropped_and_counted_in_batches(mixed_folder):
    ds = ImageFolderDataset(mixed_folder, transform=lambda im: torch.from_numpy(np.array(im.resize((4, 4)))))
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_skip_bad, num_workers=0))
    assert sum(b["num_skipped"] for b in batches) == 2
    assert sum(len(b["label"]) for b in batches) == len(ds) - 2
    assert all(b["image"].shape[1:] == (4, 4, 3) for b in batches if "image" in b)
    assert collate_skip_bad([None, None]) == {"num_skipped": 2}


def test_folder_without_class_dirs_is_recursive_and_unlabeled(tmp_path):
    _rgb((1, 1, 1)).save(tmp_path / "top.png")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    _rgb((2, 2, 2)).save(tmp_path / "deep" / "er" / "x.JPG")
    assert scan_images(tmp_path) == ["deep/er/x.JPG", "top.png"]
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == [] and ds.labels.tolist() == [-1, -1]
    assert ds[0][0].getpixel((0, 0)) == (2, 2, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------------ IDX

def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _write_idx(folder, prefix, images, labels, gz):
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


@pytest.fixture()
def idx_root(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (40, 5, 4), dtype=np.uint8)
    test = rng.integers(0, 256, (10, 5, 4), dtype=np.uint8)
    _write_idx(tmp_path, "train", train, np.arange(40, dtype=np.uint8) % 10, gz=True)
    _write_idx(tmp_path, "t10k", test, np.arange(10, dtype=np.uint8)[::-1].copy(), gz=False)
    return tmp_path, train, test


def test_fashion_mnist_from_idx_gz_and_raw(idx_root):
    root, train, test = idx_root
    ds = FashionMNIST(root, train=True, channels=1)
    assert len(ds) == 40 and ds.classes[9] == "Ankle boot"
    img, label = ds[13]
    assert img.mode == "L" and img.size == (4, 5) and label == 3
    assert np.array_equal(np.asarray(img), train[13])
    rgb, label = FashionMNIST(root, train=False)[0]
    assert rgb.mode == "RGB" and label == 9 and np.array_equal(np.asarray(rgb)[..., 1], test[0])
    sub = FashionMNIST(root, subset=0.5, seed=3)
    assert len(sub) == 20 and np.bincount(sub.labels).tolist() == [2] * 10  # stratified
    assert np.array_equal(sub.images, FashionMNIST(root, subset=0.5, seed=3).images)  # seeded
    assert not np.array_equal(sub.images, FashionMNIST(root, subset=0.5, seed=4).images)
    assert len(FashionMNIST(root, subset=7)) == 7


def test_idx_malformed_and_missing(tmp_path, idx_root):
    root, _, _ = idx_root
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x").write_bytes(b"\x00\x00\x42\x03" + b"\x00" * 20)
    with pytest.raises(IDXFormatError, match="bad magic"):
        read_idx(bad / "x")
    short = _idx_bytes(np.zeros((3, 2, 2), np.uint8))[:-2]
    (bad / "train-images-idx3-ubyte").write_bytes(short)
    (bad / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(IDXFormatError, match=r"train-images-idx3-ubyte: IDX header says shape \(3, 2, 2\)"):
        FashionMNIST(bad)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nowhere")
    assert read_idx(root / "t10k-labels-idx1-ubyte").tolist() == list(range(9, -1, -1))


def test_installed_fashion_mnist_test_split():
    ds = FashionMNIST(train=False, channels=1)  # /usr/share/datasets/fashion-mnist, see docs/data.md
    assert len(ds) == 10000 and ds[0][0].size == (28, 28)
    assert np.bincount(ds.labels).tolist() == [1000] * 10


def test_stratified_subset_unlabeled_and_counts():
    labels = np.array([-1] * 10)
    assert len(stratified_subset(labels, 0.3, 0)) == 3
    labels = np.repeat(np.arange(3), [10, 20, 30])
    pick = stratified_subset(labels, 12, 0)
    assert np.bincount(labels[pick]).tolist() == [2, 4, 6]


# ----------------------------------------------------------------------------------------------- WebDataset

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    _rgb(color, (16, 16)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def shards(tmp_path):
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(3):
                key = f"s{s}_{i:03d}"
                if i == 2 and s == 1:
                    _add(tar, key + ".jpg", b"\xff\xd8 corrupt jpeg")
                else:
                    _add(tar, key + ".jpg", _jpeg((50 * i, 0, 0)))
                if i != 1:
                    _add(tar, key + ".cls", str(i + 5 * s).encode())
    return tmp_path


def test_webdataset_shards_decode_labels_and_skip_corrupt(shards, caplog):
    ds = WebDatasetShards(str(shards / "shard-{000..001}.tar"))
    assert len(ds.urls) == 2
    with caplog.at_level(logging.WARNING, logger="beitv2.data"):
        items = list(ds)
    good = [it for it in items if it is not None]
    assert len(items) == 6 and len(good) == 5
    assert sorted(label for _, label, _ in good) == [-1, -1, 0, 2, 5]
    assert all(img.size == (16, 16) and img.mode == "RGB" for img, _, _ in good)
    assert len({sid for _, _, sid in good}) == 5
    assert len(ds.bad_files) == 1 and ds.bad_files[0][0].endswith("shard-001.tar:s1_002.jpg")
    assert "skipping unreadable image" in caplog.text and "s1_002" in caplog.text


def test_webdataset_split_by_worker_covers_every_sample_once(shards):
    ds = WebDatasetShards(str(shards / "*.tar"), transform=pil_to_tensor)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip_bad)
    batches = list(loader)
    assert sum(b["num_skipped"] for b in batches) == 1
    assert sum(len(b["label"]) for b in batches if "label" in b) == 5
    assert len(torch.cat([b["index"] for b in batches if "index" in b]).unique()) == 5


# ------------------------------------------------------------------------------------- config and building

def _ids(batches) -> list[list[int]]:
    return [b["index"].tolist() if "index" in b else [] for b in batches]


def test_webdataset_plan_fills_the_epoch_and_resumes_mid_epoch(shards):
    """A training plan: 5 batches of 2 from 6 samples (one corrupt) over 2 workers cycles the data, and a resumed
    epoch (first 3 batches consumed) yields exactly the uninterrupted run's last 2 batches."""
    def run(skip: int) -> list[dict]:
        ds = WebDatasetShards(str(shards / "*.tar"), transform=pil_to_tensor, shuffle_shards=True, seed=3)
        ds.set_epoch(1)
        ds.set_plan(StreamPlan(rank=0, world_size=1, batch_size=2, num_batches=5, skip_batches=skip))
        return list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip_bad, drop_last=True))

    full = run(0)
    assert len(full) == 5 and sum(len(b.get("index", [])) + b["num_skipped"] for b in full) == 10
    ids = [i for b in _ids(full) for i in b]
    assert len(set(ids)) == len(ids)  # a second pass over the data gets new sample ids (fresh augmentation)
    assert _ids(run(3)) == _ids(full)[3:]
    # resumed at batch 3: worker 0 serves lane 1 (batches 1, 3: 1 done, 1 left), worker 1 lane 0 (0, 2, 4: 2 + 1)
    assert StreamPlan(0, 1, 2, 5, 3).worker_quota(0, 2) == (2, 2)
    assert StreamPlan(0, 1, 2, 5, 3).worker_quota(1, 2) == (4, 2)


def test_webdataset_ranks_share_few_shards_by_sample(shards):
    """Fewer shards than slots: rank r keeps samples r, r + world, ... of every shard; together they see each once."""
    seen = []
    for rank in range(3):
        ds = WebDatasetShards(str(shards / "shard-000.tar"))
        ds.set_plan(StreamPlan(rank=rank, world_size=3, batch_size=1, num_batches=1))
        items = list(ds)
        assert len(items) == 1
        seen.append(items[0][2])
    assert seen == [sid for _, _, sid in WebDatasetShards(str(shards / "shard-000.tar"))]
    empty = WebDatasetShards(str(shards / "shard-000.tar"))  # 3 samples, 4 ranks: rank 3 would get none
    empty.set_plan(StreamPlan(rank=3, world_size=4, batch_size=1, num_batches=1))
    with pytest.raises(RuntimeError, match="read no samples"):
        list(empty)


def test_webdataset_sample_count_from_headers_or_sizes_json(shards):
    urls = [str(shards / "shard-000.tar"), str(shards / "shard-001.tar")]
    assert count_samples(urls) == 6  # the corrupt JPEG is still a sample (reported when decoded)
    (shards / "sizes.json").write_text('{"shard-000.tar": 100}')
    assert count_samples(urls) == 103
    cfg = DataConfig(kind="wds", path=str(shards / "*.tar"))
    assert build_dataset(cfg, "train").num_samples == 103
    cfg.num_samples = 40
    assert build_dataset(cfg, "train").num_samples == 40


def test_data_config_validation_names_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.path: image folder not found"):
        DataConfig(kind="folder", path=str(tmp_path / "missing")).validate("data.")
    with pytest.raises(ConfigError, match=r"^data\.path: required"):
        DataConfig(kind="folder").validate("data.")
    with pytest.raises(ConfigError, match=r"^data\.val_fraction"):
        DataConfig(kind="folder", path=str(tmp_path), val_fraction=1.0).validate("data.")
    with pytest.raises(ConfigError, match=r"^data\.subset"):
        DataConfig(kind="folder", path=str(tmp_path), subset=2.5).validate("data.")
    with pytest.raises(ConfigError, match=r"^data\.path: no WebDataset shards"):
        DataConfig(kind="wds", path=str(tmp_path / "*.tar")).validate("data.")
    with pytest.raises(ConfigError, match=r"^data\.subset: streams have no subsets"):
        DataConfig(kind="wds", path=str(tmp_path / "*.tar"), subset=0.5).validate("data.")
    with pytest.raises(ConfigError, match=r"^data\.val_path: no Fashion-MNIST IDX files"):
        DataConfig(kind="fmnist", val_path=str(tmp_path)).validate("data.")
    DataConfig(kind="fmnist").validate("data.")  # the installed default root


def test_build_dataset_folder_split_and_fmnist(tmp_path, idx_root):
    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(10):
            _rgb((i, c, 0)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    cfg = DataConfig(kind="folder", path=str(tmp_path / "imgs"), val_fraction=0.2, seed=1)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 16 and len(val) == 4 and np.bincount(val.labels).tolist() == [2, 2]
    assert not set(train.files) & set(val.files)
    assert build_dataset(DataConfig(kind="folder", path=str(tmp_path / "imgs")), "val") is None
    wrapped = build_dataset(cfg, "val", transform=lambda im: torch.tensor(im.getpixel((0, 0))))
    sample = wrapped[0]
    assert set(sample) == {"image", "label", "index"} and sample["image"].shape == (3,)
    root = idx_root[0]
    fm = DataConfig(kind="fmnist", path=str(root), subset=10)
    assert len(build_dataset(fm, "train")) == 10 and len(build_dataset(fm, "val")) == 10


# ----------------------------------------------------------------------------------- per-sample determinism

@pytest.fixture()
def small_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    return ImageFolderDataset(tmp_path)


def _mim(base, seed=0):
    tf = TwoViewTransform(input_size=16, second_input_size=8, min_crop_scale=0.2)
    return MIMDataset(base, tf, build_mask_generator("block", (4, 4), 6, min_num_patches=2), seed=seed)


def test_mim_sample_is_pure_function_of_seed_epoch_index(small_folder):
    ds = _mim(small_folder)
    before = torch.get_rng_state()
    a = ds[3]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is not disturbed
    assert a["image"].shape == (3, 16, 16) and a["tokenizer_image"].shape == (3, 8, 8)
    assert a["mask"].dtype == torch.bool and a["mask"].shape == (16,) and int(a["mask"].sum()) == 6
    assert a["label"].item() == -1 and a["index"].item() == 3
    b = _mim(small_folder)[3]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ds.set_epoch(1)
    c = ds[3]
    assert not torch.equal(a["image"], c["image"]) and not torch.equal(a["mask"], c["mask"])
    assert not torch.equal(_mim(small_folder, seed=1)[3]["image"], a["image"])


def test_mim_samples_identical_with_0_and_2_workers(small_folder):
    ds = _mim(small_folder)
    ds.set_epoch(2)
    runs = []
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate_skip_bad)
        runs.append(list(loader))
    assert len(runs[0]) == len(runs[1]) == 3
    for b0, b2 in zip(*runs):
        for k in ("image", "tokenizer_image", "mask", "index"):
            assert torch.equal(b0[k], b2[k]), k
    masks = torch.cat([b["mask"] for b in runs[0]])
    assert len({tuple(m.tolist()) for m in masks}) > 1  # fresh mask per sample


def test_tokenizer_dataset_determinism(small_folder):
    ds = TokenizerTrainDataset(small_folder, TokenizerTrainTransform(12), seed=5)
    a, b = ds[1], TokenizerTrainDataset(small_folder, TokenizerTrainTransform(12), seed=5)[1]
    assert set(a) == {"tokenizer_image", "label", "index"}
    assert a["tokenizer_image"].shape == (3, 12, 12) and a["tokenizer_image"].dtype == torch.uint8
    assert torch.equal(a["tokenizer_image"], b["tokenizer_image"])
    x = ds.batch_spec["tokenizer_image"](a["tokenizer_image"])  # what the trainer makes of it on the device
    assert set(ds.batch_spec) == {"tokenizer_image"} and 0 <= x.min() and x.max() <= 1 and x.dtype == torch.float32


def test_mim_over_webdataset_stream(shards):
    ds = _mim(WebDatasetShards(str(shards / "*.tar")))
    items = list(for_loader(ds))
    assert sum(it is None for it in items) == 1
    again = list(for_loader(_mim(WebDatasetShards(str(shards / "*.tar")))))
    good = [(x, y) for x, y in zip(items, again) if x is not None]
    assert len(good) == 5 and all(torch.equal(x["image"], y["image"]) for x, y in good)
    assert ds.bad_files  # forwarded from the stream
    view = for_loader(_mim(WebDatasetShards(str(shards / "*.tar"), num_samples=6)))
    assert view.num_samples == 6 and not hasattr(view, "__len__")  # a stream has no length


def test_trainer_hands_the_task_float_views_equal_to_the_float_path(small_folder, tmp_path):
    """The loader ships uint8 views; the trainer converts them on the device (training and validation batches),
    and the task sees exactly what a worker-side float conversion gives."""
    import torch.nn.functional as F

    from beitv2.data import EvalTransform, TransformDataset
    from beitv2.engine import OptimConfig, TrainConfig, Trainer, init_distributed, seed_everything
    from beitv2.models.backbone import BEiTViT, ViTConfig
    from beitv2.tasks import TrainTask

    class Record(TrainTask):
        def __init__(self, model):
            super().__init__(model)
            self.seen: list[dict] = []

        def forward(self, batch):
            self.seen.append({k: v.detach().clone() for k, v in batch.items() if torch.is_tensor(v)})
            return F.cross_entropy(self.net(batch["image"]).float(), torch.zeros_like(batch["label"]) + 1), {}

    def mim(output):
        tf = TwoViewTransform(16, 8, min_crop_scale=0.2, color_jitter=0.4, output=output)
        return MIMDataset(small_folder, tf, build_mask_generator("block", (4, 4), 6, min_num_patches=2), seed=3)

    train, val = mim("uint8"), TransformDataset(small_folder, EvalTransform(16), seed=0)
    assert set(train.batch_spec) == {"image", "tokenizer_image"} and set(val.batch_spec) == {"image"}
    seed_everything(0)
    model = BEiTViT(ViTConfig(img_size=(16,), patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=2))
    cfg = TrainConfig(output_dir=str(tmp_path), epochs=1, batch_size=4, precision="fp32", progress=False,
                      tensorboard=False)
    task = Record(model)
    Trainer(task, train, cfg, OptimConfig(lr=1e-3, warmup_epochs=0), dist=init_distributed("cpu"),
            val_set=val, collate_fn=collate_skip_bad).fit()
    ref_train, ref_val = mim("float"), TransformDataset(small_folder, EvalTransform(16, output="float"), seed=0)
    train_batches, val_batches = task.seen[:2], task.seen[2:]
    assert len(train_batches) == 2 and len(val_batches) == 2  # 8 images: 2 steps of 4, validation in 6 + 2
    for b in train_batches:
        for j, i in enumerate(b["index"].tolist()):
            ref = ref_train[i]
            for key in ("image", "tokenizer_image"):
                assert b[key].dtype == torch.float32 and torch.equal(b[key][j], ref[key]), (key, i)
    for b in val_batches:
        for j, i in enumerate(b["index"].tolist()):
            assert torch.equal(b["image"][j], ref_val[i]["image"]), i
