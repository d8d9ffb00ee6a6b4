"""Linear probes: how much of a factor a representation holds linearly, fitted on train, scored on held-out data
(and knn_many, a nonlinear probe family for re-checks).

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


def ridge_basis(x_train, x_test):
    """What ridge needs from the features alone, shared by every target and lambda: (centred x_train (N, D),
    eigenvalues (D,) and eigenvectors (D, D) of its Gram matrix, centred x_test in that basis (N_test, D)), torch
    float64. x_* (N, D) float64 numpy."""
    x_mean = x_train.mean(0)
    xc, xt = (torch.from_numpy(a) for a in (x_train - x_mean, x_test - x_mean))
    e, v = torch.linalg.eigh(xc.T @ xc)  # (D,), (D, D)
    return xc, e.clamp(min=0), v, xt @ v


def ridge_fit(basis, y_train, lams):
    """[(N_test, T) predictions for each lambda] of ridge with an unpenalised intercept on ridge_basis(); y_train
    (N, T) float64."""
    xc, e, v, xv = basis
    y_mean = y_train.mean(0)
    b = v.T @ (xc.T @ torch.from_numpy(y_train - y_mean))  # (D, T)
    return [(xv @ (b / (e + lam)[:, None])).numpy() + y_mean for lam in lams]


def ridge_predictions(x_train, y_train, x_test, lams):
    """[(N_test, T) predictions for each lambda]: ridge with an unpenalised intercept, one eigendecomposition of
    the (D, D) Gram matrix for the whole grid. x_* (N, D) float64, y_train (N, T)."""
    return ridge_fit(ridge_basis(x_train, x_test), y_train, lams)


def fold_bases(x, rng_seed=0):
    """[(train rows, held-out rows, ridge_basis)] of the FOLDS cross-validation folds of the train split x."""
    out = []
    for f in np.array_split(np.random.default_rng(rng_seed).permutation(len(x)), FOLDS):
        rest = np.setdiff1d(np.arange(len(x)), f)
        out.append((rest, f, ridge_basis(x[rest], x[f])))
    return out


def choose_lambda(x, y, score, folds=None):
    """Grid value with the best mean held-out `score` over FOLDS folds of the train split (folds: fold_bases(x),
    computed once for several targets)."""
    totals = np.zeros(len(RIDGE_GRID))
    for rest, f, basis in folds or fold_bases(x):
        totals += [score(y[f], p) for p in ridge_fit(basis, y[rest], RIDGE_GRID)]
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


def targets_and_score(kind, y_train, y_test, num_classes=None):
    """(y_train (N, T), y_test, score) of a probe: "continuous" (R², mean over columns), "content" (variance-weighted
    R²) or "class" (one-hot targets, accuracy of the argmax)."""
    if kind == "class":
        eye = np.eye(num_classes)
        return eye[np.asarray(y_train)], eye[np.asarray(y_test)], _accuracy_from_onehot
    y_train, y_test = (np.asarray(y, np.float64).reshape(len(y), -1) for y in (y_train, y_test))
    return y_train, y_test, r2_weighted if kind == "content" else r2


def probe_many(x_train, x_test, targets):
    """[score on the test split] of a probe fitted on train for each (kind, y_train, y_test, num_classes) of
    `targets`, all on the same features: standardised, split into folds and decomposed once, each target's ridge
    strength chosen by its own score."""
    x_train, x_test = standardise(np.asarray(x_train, np.float64), np.asarray(x_test, np.float64))
    folds, full = fold_bases(x_train), ridge_basis(x_train, x_test)
    scores = []
    for kind, y_train, y_test, num_classes in targets:
        y_train, y_test, score = targets_and_score(kind, y_train, y_test, num_classes)
        lam = choose_lambda(x_train, y_train, score, folds)
        scores.append(score(y_test, ridge_fit(full, y_train, [lam])[0]))
    return scores


def knn_many(x_train, x_test, targets, k=20):
    """probe_many's contract with another probe family, for re-checks (study/recheck.py): k-nearest-neighbour
    regression (uniform mean of the k nearest train rows' targets, Euclidean distance on standardised features;
    classes: argmax of the neighbours' one-hot mean). Nonlinear and with nothing fitted, so a factor held in any
    smooth form counts, not only linearly. k fixed a priori."""
    x_train, x_test = (torch.from_numpy(a) for a in standardise(np.asarray(x_train, np.float64),
                                                               np.asarray(x_test, np.float64)))
    nearest = torch.cdist(x_test, x_train).topk(min(k, len(x_train)), largest=False).indices.numpy()  # (N_test, k)
    scores = []
    for kind, y_train, y_test, num_classes in targets:
        y_train, y_test, score = targets_and_score(kind, y_train, y_test, num_classes)
        scores.append(score(y_test, y_train[nearest].mean(1)))
    return scores


def probe_continuous(x_train, y_train, x_test, y_test):
    """R² on the test split of a ridge probe fitted on train. x (N, D), y (N,) or (N, T)."""
    return probe_many(x_train, x_test, [("continuous", y_train, y_test, None)])[0]


def probe_content(x_train, y_train, x_test, y_test):
    """Variance-weighted R² on the test split of a ridge probe of content targets (N, k) (e.g. pca() projections)."""
    return probe_many(x_train, x_test, [("content", y_train, y_test, None)])[0]


def probe_classes(x_train, labels_train, x_test, labels_test, num_classes):
    """Accuracy on the test split of a least-squares classifier (ridge onto one-hot targets) fitted on train."""
    return probe_many(x_train, x_test, [("class", labels_train, labels_test, num_classes)])[0]


def probe(kind, x_train, y_train, x_test, y_test, num_classes=None):
    """One probe score: R² ("continuous"), variance-weighted R² ("content") or accuracy ("class")."""
    return probe_many(x_train, x_test, [(kind, y_train, y_test, num_classes)])[0]
