"""The linear probe's solver: standardisation, principal axes, L-BFGS, cross-validation.

`probe.fit_linear_probe` checks its inputs and reports; this module does the
numerical work it describes: standardise the features (`_standardize`),
change to the principal axes of the rows (`_Basis`), fit each C by
preconditioned L-BFGS (all folds as one problem) or in closed form
(`_Problem`), pick C by k-fold cross-validation (`_assign_folds`,
`_cross_validate`), and calibrate the final fit's confidence to the
held-out log-loss (`_logit_scale`). NumPy and SciPy only.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.special

from keras_transfer.errors import DataError

# The walk over C stops after this many values without improvement (see `_cross_validate`).
PATIENCE = 2
# With accuracy scoring, the walk stops early only with at least this many held-out rows.
ACCURACY_STOP_MIN_ROWS = 500
# Below this many examples, cross-validation is leave-one-out: each fold then
# trains on N - 1 rows, closest to the final fit, and fits are tiny.
LOO_MAX_EXAMPLES = 50
# Above this many examples, C is cross-validated on a stratified subset of this size.
CV_MAX_EXAMPLES = 5_000
# Up to this many examples, C is scored on more splits than one (see `_repeated_folds`).
REPEAT_MAX_EXAMPLES = 200
REPEATS = 3
# Held-out probabilities are clipped here before the log (a class absent from a
# fold's training rows has probability 0).
_PROB_FLOOR = 1e-15
# Cross-validation fits stop at this multiple of `tol` (scikit-learn's default 1e-4
# for the default tol; the held-out scores change in the 5th digit).
_CV_TOL_FACTOR = 100.0
# L-BFGS runs stopping at this tolerance or looser multiply in float32.
_FLOAT32_MIN_TOL = 1e-5
# The calibration's factor on the logits is searched in [this, 1].
_SMALLEST_LOGIT_SCALE = 1e-3
# Cross-validation fits all folds as one L-BFGS problem (`_Problem.fit_folds`) up to
# this many parameters (its history holds 40 vectors of them) and logits; one by
# one above.
_BATCH_MAX_PARAMETERS = 500_000
_BATCH_MAX_LOGITS = 5_000_000
# Largest N x N Gram matrix we build (its eigendecomposition is O(N^3)).
_GRAM_MAX_EXAMPLES = 12_000
# Largest D x D covariance we build when N >= D.
_COVARIANCE_MAX_FEATURES = 4_096


# --- Standardisation and the axes the problem is solved in -------------------------


def _standardize(x: np.ndarray, scaling: str):
    """Float64 copy, centred and scaled in place; constant columns are left at 0.

    Scale-invariant: each column is first divided by the power of two at its
    largest magnitude (exact in floating point), so that features of 1e200 or
    1e-200 neither overflow nor underflow when squared; the factor is folded
    back into `mean` and `scale`.

    Returns:
        `(xs, mean, scale, constant)`: `xs = (x - mean) / scale` and the mask of
        constant columns.
    """
    n = len(x)
    xs = np.array(x, dtype=np.float64)  # one copy; reads a memmap once
    with np.errstate(invalid="ignore"):  # NaN and inf are reported below
        exponent = np.frexp(np.max(np.abs(xs), axis=0))[1]
        exponent[~np.isfinite(xs).all(axis=0)] = 0
    xs = np.ldexp(xs, -exponent, out=xs)
    mean = xs.mean(axis=0)
    if not np.all(np.isfinite(mean)):
        bad = np.flatnonzero(~np.isfinite(xs).all(axis=1))
        raise DataError(
            f"features contain NaN or infinite values ({bad.size} of {n} rows, e.g. rows "
            f"{bad[:5].tolist()}). Check the backbone's outputs or drop those rows.")
    xs -= mean
    spread = np.sqrt(np.einsum("ij,ij->j", xs, xs) / n)  # in each column's own unit
    # Columns whose spread is only rounding error of their mean are constant.
    constant = (spread <= 1e-10 * np.abs(mean)) | (spread == 0)
    xs[:, constant] = 0.0
    spread[constant] = 1.0
    if scaling == "global" and not constant.all():
        # One unit for all columns, their root-mean-square std, computed relative
        # to the largest column exponent so that it cannot overflow.
        top = exponent[~constant].max()
        relative = np.ldexp(spread, exponent - top)[~constant]
        unit = np.sqrt(np.mean(relative ** 2))
        spread = np.ldexp(np.full_like(spread, unit), top - exponent)  # in each column's unit
        scale = np.full_like(spread, np.ldexp(unit, top))
    else:
        scale = np.ldexp(spread, exponent)
        if scaling == "global":
            scale[:] = 1.0
    xs /= spread
    return xs, np.ldexp(mean, exponent), scale, constant


class _Basis:
    """Coordinates `z = xs V` of the rows in the principal axes of the data.

    The optimal kernel is `W = V B` with `B` the optimal coefficients in these
    coordinates (the penalty is unchanged as V has orthonormal columns, and
    directions outside the rows' span only add penalty).

    Attributes:
        z: (N, r) coordinates.
        eigenvalues: (r,) sums of squares of z's columns.
        to_kernel: maps coefficients (r, K) to the kernel (D, K) on `xs`.
        name: which axes, for the report.
    """

    def __init__(self, xs: np.ndarray):
        n, d = xs.shape
        if n < d and n <= _GRAM_MAX_EXAMPLES:
            # Gram route: xs xs^T = U L U^T, z = U sqrt(L), V = xs^T U / sqrt(L).
            values, vectors = _eigh_descending(xs @ xs.T)
            root = np.sqrt(values)
            self.z = vectors * root
            self.to_kernel = lambda coef: xs.T @ (vectors @ (coef / root[:, None]))
            self.name = f"Gram axes (r={values.size})"
        elif d <= _COVARIANCE_MAX_FEATURES:
            values, vectors = _eigh_descending(xs.T @ xs)
            self.z = xs @ vectors
            self.to_kernel = lambda coef: vectors @ coef
            self.name = f"principal axes (r={values.size})"
        else:  # too big to rotate: the scaled features as they are
            values = np.einsum("ij,ij->j", xs, xs)
            self.z = xs
            self.to_kernel = lambda coef: coef
            self.name = "feature axes"
        self.eigenvalues = values


def _eigh_descending(matrix: np.ndarray):
    values, vectors = scipy.linalg.eigh(matrix, overwrite_a=True, check_finite=False)
    values, vectors = values[::-1], vectors[:, ::-1]
    # Directions whose variance is rounding error of the largest carry no signal.
    keep = values > max(values[0] * 1e-10, 0.0)
    return values[keep], np.ascontiguousarray(vectors[:, keep])


# --- Solving -----------------------------------------------------------------------


@dataclasses.dataclass
class _Solution:
    coef: np.ndarray  # (r, K) in the basis' coordinates
    intercept: np.ndarray  # (K,); -inf / +inf for outputs absent from the rows
    iterations: int = 0
    converged: bool = True

    @property
    def absent(self) -> list[int]:
        return np.flatnonzero(~np.isfinite(self.intercept)).tolist()


class _Problem:
    """The data of one probe; fits any subset of its rows for a given C."""

    def __init__(self, kind, z, y, k, weights, max_iter, tol):
        self.kind, self.z, self.y, self.k = kind, z, y, k
        self.weights, self.max_iter, self.tol = weights, max_iter, tol
        self.r = z.shape[1]

    def _rows(self, rows: np.ndarray):
        rows = rows[self.weights[rows] > 0]
        return rows, self.z[rows], self.y[rows], self.weights[rows]

    def fit(self, rows: np.ndarray, c: float, warm: _Solution | None = None,
            tol: float | None = None) -> _Solution:
        """Fits rows for one C (warm-started from `warm` if given; `tol` overrides)."""
        return self.fit_folds([rows], c, [warm], tol)[0]

    def fit_folds(self, row_sets: list, c: float, warms: list,
                  tol: float | None = None) -> list[_Solution]:
        """Fits each subset of the rows for one C: one solution per subset.

        The subsets' problems share no parameters, so the sum of their
        objectives is minimised by minimising each: one L-BFGS run over all
        of them gives every fold's solution. On small data, where a fit's cost
        is Python and SciPy overhead per iteration, that is many times faster
        than one run per fold.
        """
        if self.kind == "regression":
            return [self.ridge_path(rows, (c,))[0] for rows in row_sets]
        weights = np.zeros((len(self.y), len(row_sets)))
        for f, rows in enumerate(row_sets):
            weights[rows, f] = self.weights[rows]
        totals = weights.sum(axis=0)
        solutions: list[_Solution | None] = [None] * len(row_sets)
        for f in np.flatnonzero(totals == 0):  # every row has weight 0: nothing to learn
            solutions[f] = _Solution(np.zeros((self.r, self.k)), np.full(self.k, -np.inf))
        fitted = np.flatnonzero(totals > 0)
        if fitted.size:
            # Only rows some subset trains on: a single fold (the final fit, or folds
            # fitted one by one) computes no logits for its held-out rows.
            used = np.flatnonzero((weights[:, fitted] > 0).any(axis=1))
            z, y = (self.z, self.y) if used.size == len(self.y) else (self.z[used], self.y[used])
            fit = self._fit_softmax if self.kind == "classification" else self._fit_sigmoid
            for f, solution in zip(fitted, fit(z, y, weights[used][:, fitted], c,
                                                [warms[f] for f in fitted], tol or self.tol)):
                solutions[f] = solution
        return solutions

    def _start(self, warms, active):
        """Starting coefficients (F, r, k) and intercepts (F, k); 0 for inactive outputs."""
        coef = np.zeros((len(warms), self.r, self.k))
        intercept = np.zeros((len(warms), self.k))
        for f, warm in enumerate(warms):
            if warm is not None:
                coef[f] = warm.coef
                intercept[f] = np.nan_to_num(warm.intercept, posinf=0.0, neginf=0.0)
        coef *= active[:, None, :]
        intercept *= active
        return coef, intercept

    def _fit_softmax(self, z, y, w, c, warms, tol):
        # Classes with no training row in a fold get logit -inf there: probability 0,
        # no gradient, coefficients 0 and intercept -inf in that fold's solution.
        n = len(y)
        onehot = np.zeros((n, self.k))
        onehot[np.arange(n), y] = 1.0
        active = (onehot.T @ (w > 0)).T > 0  # (F, k): the classes each fold has
        offset = np.where(active, 0.0, -np.inf)
        rows = np.arange(n)

        def loss_and_grad(logits, wn):  # (n, F, k), (n, F)
            logits = logits + offset
            shifted = logits - logits.max(axis=2, keepdims=True)
            log_p = shifted - np.log(np.exp(shifted).sum(axis=2, keepdims=True))
            picked = np.where(wn > 0, log_p[rows, :, y], 0.0)  # a class absent: weight 0
            g = np.exp(log_p)
            g[rows, :, y] -= 1.0
            g *= wn[..., None]
            return -np.sum(wn * picked), g

        coef, bias, its, ok = _lbfgs(
            z, w, c, lambda logits: _softmax_curvature(logits + offset), loss_and_grad,
            self._start(warms, active), self.max_iter, tol)
        solutions = []
        for f in range(len(warms)):
            present = active[f]
            intercept = np.full(self.k, -np.inf)
            if present.sum() < 2:  # one class: it is certain, nothing to learn
                intercept[present] = 0.0
                solutions.append(_Solution(np.zeros((self.r, self.k)), intercept))
                continue
            # softmax ignores a common shift of the logits
            intercept[present] = bias[f, present] - bias[f, present].mean()
            solutions.append(_Solution(coef[f] * present, intercept, its, ok))
        return solutions

    def _fit_sigmoid(self, z, y, w, c, warms, tol):
        # An output whose target does not vary over a fold's training rows is
        # certain there: coefficients 0, intercept +-inf, no loss and no gradient.
        positive = (w.T @ y) > 0  # (F, k): some training row is 1
        negative = (w.T @ (1.0 - y)) > 0
        active = positive & negative
        mask = active.astype(np.float64)

        def loss_and_grad(logits, wn):  # (n, F, k), (n, F)
            # log(1 + e^z) - y z, and its derivative sigmoid(z) - y
            scale = wn[..., None] * mask
            loss = np.sum(scale * (np.logaddexp(0.0, logits) - y[:, None, :] * logits))
            g = (scipy.special.expit(logits) - y[:, None, :]) * scale
            return loss, g

        coef, bias, its, ok = _lbfgs(
            z, w, c, lambda logits: _sigmoid_curvature(logits) * mask, loss_and_grad,
            self._start(warms, active), self.max_iter, tol)
        return [_Solution(coef[f] * active[f],
                          np.where(active[f], bias[f], np.where(positive[f], np.inf, -np.inf)),
                          its, ok)
                for f in range(len(warms))]

    def ridge_path(self, rows: np.ndarray, cs) -> list[_Solution]:
        """Closed-form weighted ridge for every C, from one eigendecomposition."""
        rows, z, y, w = self._rows(rows)
        if rows.size == 0:
            return [_Solution(np.zeros((self.r, self.k)), np.zeros(self.k)) for _ in cs]
        total = w.sum()
        z_mean, y_mean = (w @ z) / total, (w @ y) / total
        root = np.sqrt(w)[:, None]
        a, t = (z - z_mean) * root, (y - y_mean) * root
        if len(a) >= self.r:  # (r x r): A^T A = V L V^T, B = V (V^T A^T t) / (L + alpha)
            values, vectors = scipy.linalg.eigh(a.T @ a, check_finite=False)
            projected = vectors.T @ (a.T @ t)
            to_coef = lambda p: vectors @ p  # noqa: E731
        else:  # (n x n): A A^T = U L U^T, B = A^T U (U^T t) / (L + alpha)
            values, vectors = scipy.linalg.eigh(a @ a.T, check_finite=False)
            projected = vectors.T @ t
            to_coef = lambda p: a.T @ (vectors @ p)  # noqa: E731
        values = np.maximum(values, 0.0)[:, None]
        out = []
        for c in cs:
            coef = to_coef(projected / (values + 1.0 / c))
            out.append(_Solution(coef, y_mean - z_mean @ coef))
        return out

    def losses(self, solution: _Solution, rows: np.ndarray, scoring: str) -> np.ndarray:
        """Per-row held-out loss (lower is better; accuracy is scored as 1 - correct)."""
        logits = self.z[rows] @ solution.coef + solution.intercept
        y = self.y[rows]
        floor = -math.log(_PROB_FLOOR)
        if self.kind == "regression":
            return ((logits - y) ** 2).mean(axis=1)
        if self.kind == "multilabel":
            loss = -np.where(y > 0, scipy.special.log_expit(logits),
                             scipy.special.log_expit(-logits))
            return np.minimum(loss, floor).mean(axis=1)
        if scoring == "accuracy":
            return (logits.argmax(axis=1) != y).astype(np.float64)
        with np.errstate(invalid="ignore"):  # no class in the training rows: -inf - -inf
            log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
        loss = -log_p[np.arange(len(y)), y]
        return np.minimum(np.nan_to_num(loss, nan=floor), floor)


def _lbfgs(z, w, c, curvature, loss_and_grad, x0, max_iter, tol):
    """Minimises mean w_f-weighted loss + ||B_f||^2 / (2 C sum(w_f)) for every column f of w.

    Each column of `w` weighs the rows of one problem (a fold: 0 for rows it
    does not train on); the problems share `z` but no parameters, so one
    run over all of them returns each one's optimum. Runs on rescaled
    coordinates `B~ = sqrt(h) * B`, `b~ = sqrt(hb) * b`, with `h` and `hb` the
    diagonal of the Hessian at the starting point (the loss's curvature per
    row and output from `curvature(logits)`). In principal axes that diagonal
    is most of the Hessian, so the rescaled problem is well conditioned. The
    stopping test is then on a gradient scaled like sqrt(f - f*), whatever
    the features' scale.

    Args:
        z: (n, r) coordinates of the rows.
        w: (n, F) row weights of the F problems, each column with a positive sum.
        c: the inverse regularisation strength.
        curvature: logits (n, F, k) -> the loss's second derivative per logit.
        loss_and_grad: logits (n, F, k), normalised weights (n, F) -> the
            summed weighted loss and its gradient (n, F, k) in the logits.
        x0: starting coefficients (F, r, k) and intercepts (F, k).

    Returns:
        `(coef (F, r, k), intercept (F, k), iterations, converged)`.
    """
    (n, r), (folds, _, k) = z.shape, x0[0].shape
    totals = w.sum(axis=0)
    wn = w / totals
    alpha = (1.0 / (c * totals))[:, None, None]  # (F, 1, 1)

    # A loose stop (cross-validation's) tolerates float32 products: their relative
    # error, about 1e-7 * sqrt(n), is far below it, and they take half the time.
    dtype = np.float32 if tol >= _FLOAT32_MIN_TOL else np.float64
    zd = z.astype(dtype, copy=False)

    def logits_of(coef, bias):  # one product for every fold's coefficients
        products = zd @ coef.transpose(1, 0, 2).reshape(r, folds * k).astype(dtype)
        return products.reshape(n, folds, k) + bias

    def per_fold(rows_by_outputs):  # (r, F * k) -> (F, r, k)
        return rows_by_outputs.reshape(r, folds, k).transpose(1, 0, 2)

    curv = curvature(logits_of(*x0)) * wn[..., None]  # (n, F, k)
    h = np.sqrt(per_fold((z * z).T @ curv.reshape(n, folds * k)) + alpha)
    hb = np.sqrt(np.maximum(curv.sum(axis=0), 1e-6))
    size = folds * r * k

    def objective(params):
        coef = params[:size].reshape(folds, r, k) / h
        bias = params[size:].reshape(folds, k) / hb
        loss, g = loss_and_grad(logits_of(coef, bias), wn)
        grad_coef = per_fold(zd.T @ g.reshape(n, folds * k).astype(dtype)) + alpha * coef
        value = loss + 0.5 * np.sum(alpha * coef * coef)
        grad = np.concatenate([(grad_coef / h).ravel(), (g.sum(axis=0) / hb).ravel()])
        return value, grad

    params = np.concatenate([(x0[0] * h).ravel(), (x0[1] * hb).ravel()])
    result = scipy.optimize.minimize(
        objective, params, jac=True, method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-15, "maxcor": 20})
    converged = bool(result.success) or (
        result.nit < max_iter and np.max(np.abs(result.jac), initial=0.0) <= 10 * tol)
    params = result.x
    return (params[:size].reshape(folds, r, k) / h, params[size:].reshape(folds, k) / hb,
            int(result.nit), converged)


def _softmax_curvature(logits: np.ndarray) -> np.ndarray:
    p = scipy.special.softmax(logits, axis=-1)
    return p * (1.0 - p)


def _sigmoid_curvature(logits: np.ndarray) -> np.ndarray:
    p = scipy.special.expit(logits)
    return p * (1.0 - p)


# --- Cross-validation ----------------------------------------------------------------


def _assign_folds(n: int, labels: np.ndarray | None, folds: int, seed: int,
                  leave_one_out: bool = True):
    """Fold index per row (-1: not used), and a description of the split.

    Leave-one-out up to `LOO_MAX_EXAMPLES` rows (unless `leave_one_out` is
    False). Otherwise the rows are shuffled, grouped by class (stratified),
    and dealt out to the folds in turn, so that each class's members go to as
    many folds as it has members. Above `CV_MAX_EXAMPLES` rows, an evenly
    spread, class-proportional subset of that many rows is cross-validated
    (C in this convention does not drift with N), and the final fit still
    uses every row.
    """
    if leave_one_out and (n <= LOO_MAX_EXAMPLES or folds >= n):
        return np.arange(n), "leave-one-out"
    folds = min(folds, n)
    order = np.random.default_rng(seed).permutation(n)
    if labels is not None:
        order = order[np.argsort(labels[order], kind="stable")]
    used = min(n, CV_MAX_EXAMPLES)
    order = order[(np.arange(used) * n) // used]
    fold_of = np.full(n, -1, dtype=np.int64)
    fold_of[order] = np.arange(used) % folds
    cv = f"{folds}-fold" + (" stratified" if labels is not None else "")
    return fold_of, cv + (f" on {used} of {n} rows" if used < n else "")


def _repeated_folds(n: int, labels: np.ndarray | None, folds: int, seed: int, repeats: int):
    """`_assign_folds`'s split and `repeats` more k-fold splits: (1 + repeats, n), a description.

    Each split is shuffled afresh (seeded by `seed` and its number), so the
    held-out scores, averaged over the splits, depend less on which rows
    happen to share a fold: on tiny data one split's accuracy moves by whole
    rows between values of C.
    """
    main, cv = _assign_folds(n, labels, folds, seed)
    if repeats <= 0:
        return main[None], cv
    extra = [_assign_folds(n, labels, folds, int(np.random.default_rng([seed, r]).integers(2**31)),
                           leave_one_out=False)
             for r in range(1, repeats + 1)]
    return np.stack([main] + [fold_of for fold_of, _ in extra]), f"{cv} + {repeats} x {extra[0][1]}"


@dataclasses.dataclass
class _CrossValidation:
    """What `_cross_validate` found."""

    chosen: float  # the C to use
    cs: tuple  # the Cs tried, ascending
    fold_scores: np.ndarray  # (folds, Cs)
    mean_scores: np.ndarray  # (Cs,)
    warm: _Solution | None  # the folds' mean solution at the best C
    iterations: int
    unconverged: int
    held_out_log_loss: float  # of the chosen C (NaN for regression)


def _cross_validate(problem: _Problem, fold_of: np.ndarray, cs,
                    scoring: str) -> _CrossValidation:
    """Held-out scores of every C on every fold; the C to use and a warm start for it.

    `fold_of` is one split (N,) or several (S, N) from `_repeated_folds`: the
    scores of C are then pooled over every split's held-out rows.

    Classification and multilabel walk the grid from strong to weak
    regularisation, each fold starting on the line through its solutions at
    the two previous values of C (`_extrapolated`).
    With the log-loss, the walk stops once `PATIENCE` values in a row have
    not improved the best mean score: held-out log-loss is unimodal in C in
    practice, and the weak end is where fits cost the most iterations. With
    the accuracy on at least `ACCURACY_STOP_MIN_ROWS` held-out rows, it stops
    once `PATIENCE` values in a row score below the best accuracy: a value
    tying it could still win on the log-loss, a value below it cannot be
    chosen. (Stopping only after 3 values that improved neither the accuracy
    nor the log-loss walked 11 of 13 values on 1,200 x 1,280 features where
    the accuracy peaked at the 5th, against 7 now, with the same C on the five
    feature sets tried: synthetic, MobileNetV2's, raw digits.)
    """
    # Several splits (rows of a 2-D fold_of) are pooled: a row's held-out score
    # in split s sits at slot s * n + row; every fold of every split is one fit.
    fold_of = np.atleast_2d(fold_of)
    n = fold_of.shape[1]
    splits = [(np.flatnonzero((row != f) & (row >= 0)), np.flatnonzero(row == f), s * n)
              for s, row in enumerate(fold_of) for f in range(int(row.max()) + 1)]
    n_folds = len(splits)
    used = np.flatnonzero(fold_of.ravel() >= 0)
    weights = np.tile(problem.weights, len(fold_of))[used]
    row_loss = np.full((len(cs), fold_of.size), np.nan)
    # Accuracy is a step function of C with many ties on small data: the
    # held-out log-loss breaks them.
    row_tiebreak = np.full((len(cs), fold_of.size), np.nan) if scoring == "accuracy" else None
    iterations = unconverged = 0
    best_solutions = None
    if problem.kind == "regression":
        for train, held, offset in splits:
            for i, solution in enumerate(problem.ridge_path(train, cs)):
                row_loss[i, offset + held] = problem.losses(solution, held, scoring)
    else:
        states: list[_Solution | None] = [None] * n_folds
        previous: list[_Solution | None] = [None] * n_folds  # each fold's at the C before
        groups = _fold_groups(problem, n_folds)
        best, since_best = math.inf, 0
        below_best = 0  # values in a row scoring below the best (not tied)
        # Accuracy over many held-out rows varies smoothly with C: once it has
        # fallen below its best, it does not come back (see the docstring).
        accuracy_stops = scoring == "accuracy" and len(used) >= ACCURACY_STOP_MIN_ROWS
        for i, c in enumerate(cs):
            # log-steps of C: how far the line through the last two solutions goes
            ratio = math.log(c / cs[i - 1]) / math.log(cs[i - 1] / cs[i - 2]) if i >= 2 else 0.0
            for group in groups:
                # Scores need 4 digits, not the weights' 6: a looser stop.
                solved = problem.fit_folds([splits[f][0] for f in group], c,
                                           [_extrapolated(states[f], previous[f], ratio)
                                            for f in group],
                                           tol=_CV_TOL_FACTOR * problem.tol)
                iterations += max(solution.iterations for solution in solved)
                for f, solution in zip(group, solved):
                    _, held, offset = splits[f]
                    previous[f], states[f] = states[f], solution
                    unconverged += not solution.converged
                    row_loss[i, offset + held] = problem.losses(solution, held, scoring)
                    if row_tiebreak is not None:
                        row_tiebreak[i, offset + held] = problem.losses(solution, held,
                                                                        "log_loss")
            score = _weighted_mean(row_loss[i, used], weights)
            if best == math.inf or score < best - _tie(best):
                best, best_solutions, since_best = score, list(states), 0
            else:
                since_best += 1
            below_best = 0 if score <= best + _tie(best) else below_best + 1
            if (scoring == "log_loss" and since_best >= PATIENCE) or (
                    accuracy_stops and below_best >= PATIENCE):
                row_loss = row_loss[: i + 1]
                break
    cs = tuple(cs[: len(row_loss)])
    mean_scores = np.array([_weighted_mean(row[used], weights) for row in row_loss])
    fold_scores = np.array([[_weighted_mean(row[offset + held], problem.weights[held])
                             for row in row_loss] for _, held, offset in splits])
    ties = np.flatnonzero(mean_scores <= mean_scores.min() + _tie(mean_scores.min()))
    if row_tiebreak is not None:  # the lowest held-out log-loss among the ties
        tiebreak = np.array([_weighted_mean(row_tiebreak[i, used], weights) for i in ties])
        chosen = int(ties[np.argmin(tiebreak)])
        log_loss = float(tiebreak.min())
    else:  # the smallest C (strongest regularisation) among the ties
        chosen = int(ties[0])
        log_loss = float(mean_scores[chosen]) if scoring == "log_loss" else math.nan
    if scoring == "accuracy":
        mean_scores, fold_scores = 1.0 - mean_scores, 1.0 - fold_scores
    warm = _average(best_solutions) if best_solutions else None
    return _CrossValidation(cs[chosen], cs, fold_scores, mean_scores, warm, iterations,
                            unconverged, log_loss)


def _extrapolated(current: _Solution | None, before: _Solution | None,
                  ratio: float) -> _Solution | None:
    """The warm start for the next C: a straight line through the last two solutions.

    The solution moves smoothly along the path of C (in log C): stepping on
    from the last two, a continuation method's predictor, starts the next
    fit closer than the last solution alone. On 1,200 x 1,280 MobileNetV2
    features (5 folds, 13 values of C) it halved the cross-validation's
    L-BFGS iterations, 258 -> 124, with the same C chosen; a longer step
    took more (1.3 times the line 180, twice the line 290).

    Args:
        current: the fold's solution at the last C (None: not fitted yet).
        before: its solution at the C before that (None: no line yet).
        ratio: log(next C / last C) / log(last C / the C before).
    """
    if current is None or before is None:
        return current
    # An intercept at -inf or +inf (an output absent or certain in the fold) stays put.
    finite = np.isfinite(current.intercept) & np.isfinite(before.intercept)
    step = np.subtract(current.intercept, before.intercept, where=finite,
                       out=np.zeros_like(current.intercept))
    return _Solution(current.coef + ratio * (current.coef - before.coef),
                     current.intercept + ratio * step)


def _fold_groups(problem: _Problem, n_folds: int) -> list[list[int]]:
    """Which folds are fitted together: all at once unless that is too big for memory.

    Measured on 2 cores: 4x faster for leave-one-out on 40 rows, 2x on 5 folds
    of 1,437 rows x 1,280 features (fewer, larger matrix products).
    """
    parameters = n_folds * (problem.r + 1) * problem.k
    logits = n_folds * len(problem.y) * problem.k
    if parameters <= _BATCH_MAX_PARAMETERS and logits <= _BATCH_MAX_LOGITS:
        return [list(range(n_folds))]
    return [[f] for f in range(n_folds)]


def _logit_scale(problem: _Problem, solution: _Solution, target_loss: float) -> float:
    """The factor t in (0, 1] that brings the training log-loss of `t * logits` to `target_loss`.

    A probe fitted to convergence is more confident on its training rows than
    on rows it has not seen; `target_loss` is what cross-validation measured
    on unseen rows. Scaling every logit by one factor (a temperature) leaves
    each prediction's class as it was and changes only its confidence. Returns
    1 when the probe is not over-confident (its training loss already reaches
    the target) or when the target is no better than predicting nothing
    (all logits 0), where a factor would erase the head.
    """
    if not np.isfinite(target_loss):
        return 1.0
    rows = np.arange(len(problem.y))

    def excess(t: float) -> float:
        scaled = _Solution(solution.coef * t, solution.intercept * t)
        return _weighted_mean(problem.losses(scaled, rows, "log_loss"), problem.weights) - target_loss

    if excess(1.0) >= 0 or excess(_SMALLEST_LOGIT_SCALE) <= 0:
        return 1.0
    return float(scipy.optimize.brentq(excess, _SMALLEST_LOGIT_SCALE, 1.0, xtol=1e-6, rtol=1e-6))


def _tie(score: float) -> float:
    return 1e-9 * max(1.0, abs(score))


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    total = weights.sum()
    return float(weights @ values / total) if total > 0 else math.nan


def _average(solutions: list[_Solution]) -> _Solution:
    """Mean of the folds' solutions: a warm start for the final fit."""
    coef = np.mean([s.coef for s in solutions], axis=0)
    intercept = np.mean([np.where(np.isfinite(s.intercept), s.intercept, 0.0)
                         for s in solutions], axis=0)
    return _Solution(coef, intercept)
