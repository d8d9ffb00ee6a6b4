"""Linear probes: how much of a factor a representation holds linearly, fitted on train, scored on held-out data.

Closed form throughout (torch float64, so torch.set_num_threads governs it; no optimiser, no iteration count to
tune): ridge regression on standardised features, its strength picked by 3-fold cross-validation on the train split
alone from a fixed grid. Continuous factors (a scalar or a vector) are scored by R² on the held-out split (mean over
the vector's coordinates, each against the held-out mean, so a probe that predicts nothing better than a constant
scores <= 0). Class factors are scored by accuracy of a least-squares classifier (ridge onto one-hot targets,
argmax).

Content (no known factors needed): the top principal components of a feature set (PCA fitted on train), scored by
the variance-weighted R² over them (1 - total SSE / total SST: the fraction of that top-k variance a probe
recovers; invariant to a rotation of the components, so their signs do not matter).
"""
import numpy as np
import torch

RIDGE_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)  # on standardised features, so relative to the sample count
FOLDS = 3


def standardise(train, test):
    """Feature-wise z-score with the train split's statistics (constant features stay 0)."""
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def ridge_predictions(x_train, y_train, x_test, lams):
    """[(N_test, T) predictions for each lambda]: ridge with an unpenalised intercept, one eigendecomposition of
    the (D, D) Gram matrix for the whole grid. x_* (N, D) float64, y_train (N, T)."""
    x_mean, y_mean = x_train.mean(0), y_train.mean(0)
    xc, xt, yc = (torch.from_numpy(a) for a in (x_train - x_mean, x_test - x_mean, y_train - y_mean))
    e, v = torch.linalg.eigh(xc.T @ xc)  # (D,), (D, D)
    b = v.T @ (xc.T @ yc)  # (D, T)
    xv = xt @ v  # (N_test, D)
    return [(xv @ (b / (e.clamp(min=0) + lam)[:, None])).numpy() + y_mean for lam in lams]


def choose_lambda(x, y, score, rng_seed=0):
    """Grid value with the best mean held-out `score` over FOLDS folds of the train split."""
    folds = np.array_split(np.random.default_rng(rng_seed).permutation(len(x)), FOLDS)
    totals = np.zeros(len(RIDGE_GRID))
    for f in folds:
        rest = np.setdiff1d(np.arange(len(x)), f)
        preds = ridge_predictions(x[rest], y[rest], x[f], RIDGE_GRID)
        totals += [score(y[f], p) for p in preds]
    return RIDGE_GRID[int(np.argmax(totals))]


def r2(y_true, y_pred):
    """Mean over columns of 1 - SSE / SST (SST around the scored split's own mean), as sklearn's r2_score."""
    sse = ((y_true - y_pred) ** 2).sum(0)
    sst = ((y_true - y_true.mean(0)) ** 2).sum(0)
    return float(np.mean(1.0 - sse / np.maximum(sst, 1e-12)))


def r2_weighted(y_true, y_pred):
    """1 - total SSE / total SST over every column (sklearn's r2_score(multioutput="variance_weighted"))."""
    sse = ((y_true - y_pred) ** 2).sum()
    sst = ((y_true - y_true.mean(0)) ** 2).sum()
    return float(1.0 - sse / max(sst, 1e-12))


def pca(x_train, k):
    """(mean (D,), components (D, k')) of the top k' = min(k, D, N - 1) principal components of x_train (N, D), by
    decreasing variance; project with (x - mean) @ components."""
    x = np.asarray(x_train, np.float64)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)  # rows of vt: directions by decreasing variance
    return mean, vt[:min(k, x.shape[1], len(x) - 1)].T


def _accuracy_from_onehot(y_true, y_pred):
    return float((y_true.argmax(1) == y_pred.argmax(1)).mean())


def probe_continuous(x_train, y_train, x_test, y_test, score=r2):
    """`score` (R², mean over columns; or r2_weighted) on the test split of a ridge probe fitted on train, its
    strength chosen by the same score. x (N, D), y (N,) or (N, T)."""
    x_train, x_test = standardise(np.asarray(x_train, np.float64), np.asarray(x_test, np.float64))
    y_train = np.asarray(y_train, np.float64).reshape(len(x_train), -1)
    y_test = np.asarray(y_test, np.float64).reshape(len(x_test), -1)
    lam = choose_lambda(x_train, y_train, score)
    return score(y_test, ridge_predictions(x_train, y_train, x_test, [lam])[0])


def probe_content(x_train, y_train, x_test, y_test):
    """Variance-weighted R² on the test split of a ridge probe of content targets (N, k) (e.g. pca() projections)."""
    return probe_continuous(x_train, y_train, x_test, y_test, score=r2_weighted)


def probe_classes(x_train, labels_train, x_test, labels_test, num_classes):
    """Accuracy on the test split of a least-squares classifier (ridge onto one-hot targets) fitted on train."""
    x_train, x_test = standardise(np.asarray(x_train, np.float64), np.asarray(x_test, np.float64))
    eye = np.eye(num_classes)
    y_train, y_test = eye[np.asarray(labels_train)], eye[np.asarray(labels_test)]
    lam = choose_lambda(x_train, y_train, _accuracy_from_onehot)
    return _accuracy_from_onehot(y_test, ridge_predictions(x_train, y_train, x_test, [lam])[0])


def probe(kind, x_train, y_train, x_test, y_test, num_classes=None):
    """One probe score: R² ("continuous") or accuracy ("class")."""
    if kind == "class":
        return probe_classes(x_train, y_train, x_test, y_test, num_classes)
    return probe_continuous(x_train, y_train, x_test, y_test)
