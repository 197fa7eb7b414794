"""Any folder of images as a data set: class sub-folders give labels (else label -1).

A file that cannot be decoded is never replaced by another image (the official code silently substitutes a random
sample): ``__getitem__`` returns ``None``, logs ``skipping unreadable image <path>: <reason>`` on the "beitv2.data"
logger and records ``(path, reason)`` in ``bad_files``; `collate_skip_bad` then drops it and counts it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .images import IMG_EXTENSIONS, BadFileLog, BadImageError, load_image, report_bad


def scan_images(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> list[str]:
    """Relative paths of all image files under ``root`` (recursive, sorted, hidden entries skipped).

    Uses ``os.scandir`` only: no file is opened, so scanning a million files costs one directory walk.
    """
    exts = tuple(e.lower() for e in extensions)
    root = os.fspath(root)
    found: list[str] = []
    stack = [""]
    seen_dirs: set[tuple[int, int]] = set()
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel)) as it:
                entries = list(it)
        except OSError as e:
            report_bad(os.path.join(root, rel), f"cannot list directory: {e}")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = os.path.join(rel, entry.name) if rel else entry.name
            try:
                if entry.is_dir():
                    st = entry.stat()
                    if (st.st_dev, st.st_ino) not in seen_dirs:  # symlink loops
                        seen_dirs.add((st.st_dev, st.st_ino))
                        stack.append(child)
                elif entry.name.lower().endswith(exts) and entry.is_file():
                    found.append(child)
            except OSError:
                continue
    found.sort()
    return found


def has_images(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> bool:
    """Whether any image file lies under ``root``: the walk of `scan_images`, stopped at the first one found."""
    exts = tuple(e.lower() for e in extensions)
    stack = [os.fspath(root)]
    seen: set[tuple[int, int]] = set()
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.name.lower().endswith(exts) and entry.is_file():
                    return True
                if entry.is_dir():
                    st = entry.stat()
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        stack.append(entry.path)
            except OSError:
                continue
    return False


class ImageFolderDataset(BadFileLog, Dataset):
    """All images under ``root``; class labels from first-level sub-folders when every image lies in one.

    Unlike torchvision's ``ImageFolder`` no class sub-folders are needed (unlabeled pre-training collections): if any
    image sits directly in ``root``, ``classes`` is empty and every label is -1.
    """

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS, channels: int = 3,
                 transform: Callable | None = None, _files: list[str] | None = None):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.channels = channels
        self.transform = transform
        self.extensions = tuple(extensions)
        files = scan_images(self.root, extensions) if _files is None else _files
        if _files is None and not files:
            raise FileNotFoundError(f"no images with extensions {', '.join(self.extensions)} under {self.root}")
        all_in_dirs = all(os.sep in f for f in files)
        self.classes: list[str] = sorted({f.split(os.sep, 1)[0] for f in files}) if all_in_dirs else []
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.files = files
        self.labels = np.array([self.class_to_idx[f.split(os.sep, 1)[0]] for f in files] if all_in_dirs
                               else [-1] * len(files), dtype=np.int64)
        self._init_bad()

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])

    def subset(self, indices: Sequence[int]) -> ImageFolderDataset:
        """A view on some of the files, keeping the class list of the whole folder."""
        sub = ImageFolderDataset.__new__(ImageFolderDataset)
        sub.__dict__.update(self.__dict__)
        sub.files = [self.files[i] for i in indices]
        sub.labels = self.labels[np.asarray(indices, dtype=np.int64)]
        sub._init_bad()
        return sub

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path = self.path(index)
        try:
            img = load_image(path, self.channels)
        except BadImageError as e:
            self._record_bad(path, str(e))
            return None
        return (self.transform(img) if self.transform else img), int(self.labels[index])
