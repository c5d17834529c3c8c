"""Edge detection: balanced BCE (positive weight 0.95) and the BSDS/SEISM ODS/OIS/AP boundary benchmark.

The metric replaces the field's MATLAB step (SEISM): each probability map is thresholded at
``t_i = i / (n + 1)``, ``i = 1..n``, thinned (MATLAB ``bwmorph(..., 'thin', inf)``, here
``skimage.morphology.thin``) and matched to the ground-truth edges with the BSDS pixel correspondence
(pyEdgeEval's ``correspond_pixels``, the same C++ matcher, at tolerance ``max_dist`` × image diagonal).
Per image and threshold four counts are kept: matched ground-truth pixels, ground-truth pixels,
matched predicted pixels and predicted pixels. From them, as BSDS defines (and pyEdgeEval computes):

- ``odsF``: recall and precision of the dataset-summed counts per threshold; between each pair of
  neighbouring thresholds they are interpolated linearly at 101 points; the best F there.
- ``oisF``: each image's threshold with the best F (the first on ties), its counts summed over
  images, F of the sums.
- ``AP``: sum over recall levels r = 0, 0.01, ..., 0.99 of the largest precision with recall >= r,
  divided by 101 (pyEdgeEval's definition).

All three are reported in percent. Ignored label pixels (255) are set to "no edge" in both the
prediction and the ground truth before matching, so they count neither as hits nor as false alarms.

Two properties of the BSDS matcher (the same C++ code as BSDS/SEISM's MATLAB ``correspondPixels``):
it links every pixel to a few *random* outlier nodes, from a generator seeded by the clock, so
repeated evaluations differ in the last digits (a matched pixel more or less per call), and a
perfect prediction scores a little under 100 (about 99.7 on large maps: the random outlier graph
forces ~0.25 % of pixels to outliers). It is also slow: roughly 0.3-0.5 s per threshold for a
512 × 512 map, so use ``workers`` or fewer thresholds for quick validation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging

import numpy as np
import torch

from ..utils.errors import ConfigError
from .base import IGNORE, Metric, Task, check_batch, check_positive_int
from .sal import balanced_bce_with_logits, binary_map_for_picture, sigmoid_probability

__all__ = ["Edge", "EdgeMetric", "edge_counts", "boundary_scores"]

logger = logging.getLogger(__name__)

# Rows of the per-image count arrays.
COUNT_R, SUM_R, COUNT_P, SUM_P = range(4)


def edge_counts(
    prob: np.ndarray, gt: np.ndarray, thresholds: np.ndarray, max_dist: float, thin: bool = True
) -> np.ndarray:
    """Counts ``int64 [4, T]`` (matched gt, gt, matched pred, pred) of one probability map at ascending ``thresholds``.

    ``prob`` is ``[H, W]`` in [0, 1] and ``gt`` a boolean ``[H, W]`` edge map. Thresholds giving the
    same binary map as the previous one reuse its counts; once the map is empty, the rest are empty.
    """
    from pyEdgeEval import correspond_pixels  # looked up per call: tests substitute a deterministic matcher

    if thin:
        from skimage.morphology import thin as thin_binary
    if np.any(np.diff(thresholds) <= 0):
        raise ValueError("thresholds must be strictly ascending")
    gt = np.asarray(gt, dtype=bool)
    prob = np.asarray(prob, dtype=np.float64)  # compare with the float64 thresholds exactly
    gt_sum = int(gt.sum())
    counts = np.zeros((4, len(thresholds)), dtype=np.int64)
    counts[SUM_R] = gt_sum
    # Nested binary maps: equal pixel counts mean equal maps.
    sorted_prob = np.sort(prob, axis=None)
    num_above = sorted_prob.size - np.searchsorted(sorted_prob, thresholds, side="left")  # count of prob >= t
    for i, t in enumerate(thresholds):
        if num_above[i] == 0:
            break  # every later threshold is empty too: no matches, no predictions
        if i > 0 and num_above[i] == num_above[i - 1]:
            counts[:, i] = counts[:, i - 1]
            continue
        binary = prob >= t
        if thin:
            binary = thin_binary(binary)
        counts[SUM_P, i] = int(binary.sum())
        if gt_sum > 0:
            match_pred, match_gt = correspond_pixels(binary, gt, max_dist=max_dist)[:2]
            counts[COUNT_R, i] = int((match_gt > 0).sum())
            counts[COUNT_P, i] = int((match_pred > 0).sum())
    return counts


def _recall_precision_f(count_r, sum_r, count_p, sum_p):
    recall = count_r / (sum_r + (sum_r == 0))
    precision = count_p / (sum_p + (sum_p == 0))
    return recall, precision, _f_measure(precision, recall)


def _f_measure(precision, recall):
    total = precision + recall
    return 2.0 * precision * recall / (total + (total == 0))


def boundary_scores(per_image_counts: np.ndarray) -> dict[str, float]:
    """ODS F, OIS F and AP (fractions, not percent) from counts ``[N, 4, T]`` of ``N`` images at ``T`` thresholds."""
    counts = np.asarray(per_image_counts, dtype=np.float64)
    if counts.ndim != 3 or counts.shape[1] != 4 or counts.shape[0] == 0:
        raise ValueError(f"per-image counts must be [N >= 1, 4, T], got shape {counts.shape}")
    # ODS: dataset-summed counts per threshold, best F along the piecewise-linear PR curve.
    total = counts.sum(axis=0)
    recall, precision, f = _recall_precision_f(*total)
    best_f = float(f[0])
    d = np.linspace(0, 1, num=101)
    for i in range(1, counts.shape[2]):
        r = recall[i] * d + recall[i - 1] * (1 - d)
        p = precision[i] * d + precision[i - 1] * (1 - d)
        best_f = max(best_f, float(_f_measure(p, r).max()))
    # OIS: each image at its own best threshold.
    _, _, f_per_image = _recall_precision_f(counts[:, COUNT_R], counts[:, SUM_R], counts[:, COUNT_P], counts[:, SUM_P])
    best = np.argmax(f_per_image, axis=1)
    at_best = counts[np.arange(counts.shape[0]), :, best].sum(axis=0)
    _, _, ois_f = _recall_precision_f(*at_best)
    # AP: interpolated precision at 100 recall levels, over 101 (as pyEdgeEval defines it).
    ap = 0.0
    for level in np.arange(0, 1, 0.01):
        ap += np.max(precision[recall >= level], initial=0) / 101
    return {"odsF": best_f, "oisF": float(ois_f), "AP": float(ap)}


class EdgeMetric(Metric):
    """``odsF``, ``oisF``, ``AP`` (percent) of predicted edge logits; see the module docstring.

    Options: ``num_thresholds`` (99), ``max_dist`` (0.0075 for PASCAL-Context; NYUD uses 0.011),
    ``thin`` (True: thin each binary map like MATLAB's ``bwmorph thin``), ``workers`` (0: evaluate
    images inline in ``update``; > 0: a process pool of that size, collected in ``compute``; call
    ``close()`` or ``compute()`` to release it).
    """

    def __init__(
        self, task: Task, num_thresholds: int = 99, max_dist: float = 0.0075, thin: bool = True, workers: int = 0
    ) -> None:
        self.task = task
        n = check_positive_int("num_thresholds", num_thresholds)
        self.thresholds = np.arange(1, n + 1, dtype=np.float64) / (n + 1)
        if not (isinstance(max_dist, (int, float)) and 0 < max_dist < 1):
            raise ConfigError(f"max_dist must be a fraction of the image diagonal in (0, 1), got {max_dist!r}")
        self.max_dist = float(max_dist)
        self.thin = bool(thin)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"workers must be an int >= 0, got {workers!r}")
        self.workers = workers
        self._executor: concurrent.futures.Executor | None = None
        self._pending: collections.deque = collections.deque()
        self.per_image: list[np.ndarray] = []

    def reset(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self.per_image = []

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = check_batch(self.task, pred, target)
        valid = target[:, 0] != IGNORE
        prob = torch.where(valid, torch.sigmoid(pred[:, 0].float()), torch.zeros_like(pred[:, 0], dtype=torch.float32))
        gt = valid & (target[:, 0] > 0.5)
        prob_np = prob.cpu().numpy()
        gt_np = gt.cpu().numpy()
        for b in range(prob_np.shape[0]):
            args = (prob_np[b], gt_np[b], self.thresholds, self.max_dist, self.thin)
            if self.workers == 0:
                self.per_image.append(edge_counts(*args))
                continue
            if self._executor is None:
                self._executor = concurrent.futures.ProcessPoolExecutor(max_workers=self.workers)
            self._pending.append(self._executor.submit(edge_counts, *args))
            while len(self._pending) > 4 * self.workers:  # bound the maps waiting in memory
                self.per_image.append(self._pending.popleft().result())

    def _collect(self) -> None:
        while self._pending:
            self.per_image.append(self._pending.popleft().result())

    def close(self) -> None:
        """Finish pending images and shut the worker pool down (a later ``update`` starts a new one)."""
        self._collect()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def __del__(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def compute(self) -> dict[str, float]:
        self.close()
        if not self.per_image:
            return {"odsF": 0.0, "oisF": 0.0, "AP": 0.0}
        scores = boundary_scores(np.stack(self.per_image))
        return {k: v * 100 for k, v in scores.items()}


class Edge(Task):
    """Edge detection (label ``float32 [1, H, W]``: 1 on edge pixels, 0 elsewhere, 255 ignored; one logit channel).

    Option ``pos_weight`` (0.95): weight of edge pixels in the balanced BCE (non-edges get 1 - it).
    """

    pointwise_colors = True

    name = "edge"
    title = "edges"
    label_kind = "dense"
    label_channels = 1
    default_channels = 1
    higher_is_better = {"odsF": True, "oisF": True, "AP": True}
    primary_metric = "odsF"
    headline_metrics = ("odsF",)

    def __init__(self, pos_weight: float = 0.95) -> None:
        if isinstance(pos_weight, bool) or not isinstance(pos_weight, (int, float)) or not 0 <= pos_weight <= 1:
            raise ConfigError(f"pos_weight must be in [0, 1], got {pos_weight!r}")
        self.pos_weight = float(pos_weight)
        self.channels = 1

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = check_batch(self, pred, target)
        return balanced_bce_with_logits(pred, target, pos_weight=self.pos_weight)

    def new_metric(
        self, num_thresholds: int = 99, max_dist: float = 0.0075, thin: bool = True, workers: int = 0
    ) -> Metric:
        """See ``EdgeMetric`` for the options."""
        return EdgeMetric(self, num_thresholds=num_thresholds, max_dist=max_dist, thin=thin, workers=workers)

    def metric_options(self, eval_cfg) -> dict:
        """``num_thresholds``, ``max_dist`` and ``workers`` from the evaluation config's ``edge_thresholds``,
        ``edge_max_dist`` and ``edge_workers`` (none without a config)."""
        if eval_cfg is None:
            return {}
        return {"num_thresholds": eval_cfg.edge_thresholds, "max_dist": eval_cfg.edge_max_dist,
                "workers": eval_cfg.edge_workers}

    def decode(self, pred: torch.Tensor) -> np.ndarray:
        """Edge probability ``float32 [H, W]``: the sigmoid of the logit."""
        return sigmoid_probability(pred)

    def colorize(self, x, kind: str = "auto") -> np.ndarray:
        """Grey picture: sigmoid probability of logits, or the 0/1 label (ignored pixels black)."""
        return binary_map_for_picture(self, x, kind)
