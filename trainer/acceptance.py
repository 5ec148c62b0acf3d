"""Is a retrained model better than the one it would replace? A paired test on the same rows.

Both models answer the same held-out rows, so the comparison is paired:

* classification: McNemar's exact test. Only the discordant rows carry information: ``b`` rows
  the candidate gets right and the incumbent wrong, ``c`` the reverse. Under "no difference"
  ``b`` is Binomial(b + c, 1/2); the one-sided p-value is P(X >= b) (scipy.stats.binomtest,
  alternative="greater").
* regression: the Wilcoxon signed-rank test on d_i = |e_incumbent,i| - |e_candidate,i|, one
  sided (the candidate's absolute errors are smaller). Absolute errors are skewed and
  heavy-tailed (a few rows carry most of the error), which a paired t-test's normal
  approximation handles poorly on a few hundred rows; the signed-rank test assumes neither
  normality nor equal variances and is the standard paired test for such differences.

The candidate is accepted when the test is significant at ``alpha`` AND the effect reaches
``margin``: accuracy gain >= margin (accuracy points in [0, 1)), or MAE reduction >= margin (in
the target's units).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainer import metrics

__all__ = ["DEFAULT_ALPHA", "decide"]

DEFAULT_ALPHA = 0.05


def _mcnemar(base_ok: np.ndarray, cand_ok: np.ndarray) -> tuple[float, dict[str, int]]:
    from scipy.stats import binomtest

    b = int((cand_ok & ~base_ok).sum())
    c = int((base_ok & ~cand_ok).sum())
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="greater").pvalue)
    return p, {"candidate_only_correct": b, "baseline_only_correct": c}


def _wilcoxon(d: np.ndarray) -> float:
    from scipy.stats import wilcoxon

    if not np.any(d != 0):
        return 1.0  # identical errors on every row: no evidence either way
    return float(wilcoxon(d, alternative="greater", zero_method="wilcox").pvalue)


def decide(task: str, baseline_out: np.ndarray, candidate_out: np.ndarray, y: np.ndarray,
           *, margin: float, alpha: float = DEFAULT_ALPHA, data: str = "") -> dict[str, Any]:
    """The acceptance record (acceptance.json) for two models' outputs on the rows ``y``."""
    if len(y) == 0:
        raise ValueError("no rows to compare the models on")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha} is not in (0, 1)")
    doc: dict[str, Any] = {"task": task, "data": data, "rows": len(y), "margin": margin,
                           "alpha": alpha}
    if task == "classification":
        base_ok = np.asarray(baseline_out).argmax(1) == y
        cand_ok = np.asarray(candidate_out).argmax(1) == y
        p, counts = _mcnemar(base_ok, cand_ok)
        base, cand = float(base_ok.mean()), float(cand_ok.mean())
        effect = cand - base
        doc.update(test="mcnemar-exact", p_value=p, baseline_accuracy=base,
                   candidate_accuracy=cand, accuracy_gain=effect, **counts)
        name, fmt = "McNemar exact", ".3f"
    else:
        truth = np.asarray(y, dtype=np.float64)
        base_err = np.abs(metrics.values(baseline_out) - truth)
        cand_err = np.abs(metrics.values(candidate_out) - truth)
        p = _wilcoxon(base_err - cand_err)
        base, cand = float(base_err.mean()), float(cand_err.mean())
        effect = base - cand
        doc.update(test="wilcoxon-signed-rank", p_value=p, baseline_mae=base, candidate_mae=cand,
                   mae_reduction=effect)
        name, fmt = "Wilcoxon signed-rank", ".4g"
    significant = p < alpha
    doc["accepted"] = bool(significant and effect >= margin)
    if doc["accepted"]:
        why = "accepted"
    elif not significant:
        why = f"rejected (not significant at alpha {alpha:g})"
    else:
        why = "rejected (gain below the margin)"
    what = "accuracy" if task == "classification" else "MAE"
    doc["summary"] = (f"{name} p={p:.3g} on {len(y)} rows of {data}: new {what} "
                      f"{cand:{fmt}} vs current {base:{fmt}} (margin {margin:g}): {why}")
    return doc
