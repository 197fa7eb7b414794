"""Weighted k-NN classification on frozen features (DINO's protocol, `eval_knn.knn_classifier`).

Features are l2-normalised; each validation sample takes its k most cosine-similar training samples, which vote for
their class with weight exp(similarity / T). Several k are scored from one top-k search (the largest k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check, opt
from .metrics import accuracy
from .splits import SplitFeatures


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
               ks: tuple[int, ...] = (20,), temperature: float = 0.07, chunk_size: int = 1024,
               device: torch.device | str | None = None, train_chunk: int = 65536) -> dict[int, torch.Tensor]:
    """Class scores [num_val, num_classes] (on the CPU) for every k in ``ks`` (k is capped at the number of training
    samples).

    Runs on ``device`` (the accelerator; default: where the features are). The normalised training features are
    moved there once; similarities are computed in blocks of ``chunk_size`` validation x ``train_chunk`` training
    samples, keeping a running top-k, so the largest temporary is that block, not num_val x num_train.
    """
    device = torch.device(device) if device is not None else train_feats.device
    train = F.normalize(train_feats.to(device, torch.float32), dim=1)
    labels = train_labels.to(device).long()
    kmax = min(max(ks), train.shape[0])
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for s in range(0, val_feats.shape[0], chunk_size):
        val = F.normalize(val_feats[s:s + chunk_size].to(device, torch.float32), dim=1)
        top_sim = torch.empty(val.shape[0], 0, device=device)
        top_idx = torch.empty(val.shape[0], 0, dtype=torch.long, device=device)
        for t in range(0, train.shape[0], train_chunk):
            sim = val @ train[t:t + train_chunk].t()
            blk_sim, blk_idx = sim.topk(min(kmax, sim.shape[1]), dim=1)
            top_sim, pick = torch.cat([top_sim, blk_sim], 1).topk(min(kmax, top_sim.shape[1] + blk_sim.shape[1]),
                                                                  dim=1)  # sorted, most similar first
            top_idx = torch.cat([top_idx, blk_idx + t], 1).gather(1, pick)
        weights = (top_sim / temperature).exp()
        one_hot = F.one_hot(labels[top_idx], num_classes).float()  # [b, kmax, C]
        for k in ks:
            kk = min(k, kmax)
            out[k].append((one_hot[:, :kk] * weights[:, :kk, None]).sum(dim=1).cpu())
    return {k: torch.cat(v) if v else torch.zeros(0, num_classes) for k, v in out.items()}


def evaluate_knn(feats: SplitFeatures, cfg: KNNConfig, device: torch.device | None = None) -> dict:
    """{'layers': {block: {k: {acc1, acc5}}}, best block / k, counts} of the k-NN vote of every block and k in
    ``cfg`` (the `beitv2 knn` command's metrics, also the quickstart's raw-pixel and CNN rows)."""
    ks = tuple(sorted({int(k) for k in cfg.k}))
    results: dict[str, dict[str, dict[str, float]]] = {}
    best = (-1.0, 0, 0)
    for x in sorted(feats.val):
        scores = knn_scores(feats.train[x], feats.train_labels, feats.val[x], feats.num_classes, ks,
                            cfg.temperature, cfg.chunk_size, device=device)
        results[str(x)] = {str(k): accuracy(scores[k], feats.val_labels) for k in ks}
        for k in ks:
            best = max(best, (results[str(x)][str(k)]["acc1"], x, k))
    return {"layers": results, "best_layer": best[1], "best_k": best[2], "acc1": best[0],
            "acc5": results[str(best[1])][str(best[2])]["acc5"], "temperature": cfg.temperature,
            "num_train": int(len(feats.train_labels)), "num_val": int(len(feats.val_labels)),
            "num_classes": feats.num_classes}
