"""SODA step 2: the target class (MAD outlier of attribution-profile dissimilarity), then the
source class (highest mean target logit), as ``detect`` does (reference §2.3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Outliers:
    """MAD outlier test on values normalised by their max (reference ``outlier_detection``)."""

    normalised: np.ndarray
    z: np.ndarray
    """Signed (v - median) / MAD of every entry (inf where MAD is 0 and v differs)."""
    flags: list[int]
    """Indices with v >= median and |z| > threshold, sorted ascending by value."""


def mad_outliers(values: np.ndarray, threshold: float) -> Outliers:
    """Upper-tail MAD test: divide by max, median m, MAD = 1.4826 median|v - m|, flag v >= m
    with |v - m| / MAD > threshold."""
    v = np.asarray(values, dtype=np.float64)
    if v.max() > 0:  # the reference divides by the max unconditionally (NaN at 0)
        v = v / v.max()
    m = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - m)))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(v == m, 0.0, (v - m) / mad) if mad == 0 else (v - m) / mad
    flagged = [i for i in range(len(v)) if v[i] >= m and abs(z[i]) > threshold]
    flagged.sort(key=lambda i: v[i])
    return Outliers(v, z, flagged)


def pcc_matrix(ca: np.ndarray) -> np.ndarray:
    """(C, C): pcc[s, i] = Pearson(mean_{j != i} CA_s[:, j], CA_s[:, i]) over neurons, 0 on
    the diagonal; ``ca`` is (C analysed classes, N neurons, C classes)."""
    num = ca.shape[0]
    pcc = np.zeros((num, ca.shape[2]))
    for s in range(num):
        h = ca[s]
        total = h.sum(1)
        for i in range(h.shape[1]):
            if i == s:
                continue
            ref = (total - h[:, i]) / (h.shape[1] - 1)
            pcc[s, i] = np.corrcoef(ref, h[:, i])[0, 1]
    return pcc


def target_scores(ca: np.ndarray) -> np.ndarray:
    """score_i = 1 - mean_s pcc[s, i] (mean over all rows, the zero diagonal included)."""
    return 1.0 - pcc_matrix(ca).mean(0)


@dataclass
class SourcePick:
    source: int
    ce: np.ndarray
    outliers: Outliers
    rule: str


def pick_source(
    ce: np.ndarray, target: int, own_logits: np.ndarray, threshold: float
) -> SourcePick:
    """Source for ``target`` from ``ce[s]`` = mean target logit over class-s samples.

    ``ce[target]`` is set to 0; MAD flags at ``threshold``; with several flags the one with the
    lowest ``own_logits[s]`` (mean logit of s over the target's own samples) wins, else argmax.
    """
    ce = np.asarray(ce, dtype=np.float64).copy()
    ce[target] = 0.0
    out = mad_outliers(ce, threshold)
    if len(out.flags) > 1:
        source = min(out.flags, key=lambda s: own_logits[s])
        return SourcePick(int(source), ce, out, "several flagged: lowest logit on target samples")
    return SourcePick(int(np.argmax(ce)), ce, out, "argmax mean target logit")
