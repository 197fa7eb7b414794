"""Weighted k-NN classification on frozen features (DINO's protocol, `eval_knn.knn_classifier`).

Features are l2-normalised; each validation sample takes its k most cosine-similar training samples, which vote for
their class with weight exp(similarity / T). Several k are scored from one top-k search (the largest k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check, opt


@dataclass
class KNNConfig:
    """``--knn.*``"""

    k: tuple[int, ...] = opt((10, 20, 100, 200), "neighbour counts to score (DINO reports 20)")
    temperature: float = opt(0.07, "vote weight exp(cosine / T) (DINO: 0.07)")
    chunk_size: int = opt(1024, "validation samples per similarity block (memory: chunk x num_train)")
    crop_pct: float = opt(0.875, "feature transform: resize to size / crop_pct, centre crop")
    normalize: str = opt("auto", "input normalisation: auto (the backbone's own, see docs), imagenet, inception, "
                                 "clip or none")

    def validate(self, prefix: str = "knn.") -> None:
        check(len(self.k) >= 1 and all(int(k) >= 1 for k in self.k), prefix + "k", f"values >= 1, got {self.k}")
        check(self.temperature > 0, prefix + "temperature", "must be > 0")
        check(self.chunk_size >= 1, prefix + "chunk_size", "must be >= 1")
        check(0 < self.crop_pct <= 1, prefix + "crop_pct", "must be in (0, 1]")
        check(self.normalize in ("auto", "imagenet", "inception", "clip", "none"), prefix + "normalize",
              f"auto, imagenet, inception, clip or none, got {self.normalize!r}")


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor, num_classes: int,
               ks: tuple[int, ...] = (20,), temperature: float = 0.07, chunk_size: int = 1024
               ) -> dict[int, torch.Tensor]:
    """Class scores [num_val, num_classes] for every k in ``ks`` (k is capped at the number of training samples)."""
    train = F.normalize(train_feats.float(), dim=1)
    val = F.normalize(val_feats.float(), dim=1)
    kmax = min(max(ks), train.shape[0])
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for s in range(0, val.shape[0], chunk_size):
        sim = val[s:s + chunk_size] @ train.t()
        top_sim, top_idx = sim.topk(kmax, dim=1)  # sorted, most similar first
        weights = (top_sim / temperature).exp()
        one_hot = F.one_hot(train_labels[top_idx].long(), num_classes).float()  # [b, kmax, C]
        for k in ks:
            kk = min(k, kmax)
            out[k].append((one_hot[:, :kk] * weights[:, :kk, None]).sum(dim=1))
    return {k: torch.cat(v) if v else torch.zeros(0, num_classes) for k, v in out.items()}
