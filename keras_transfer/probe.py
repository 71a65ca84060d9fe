"""A converged, cross-validated linear probe on cached features (NumPy and SciPy only).

A linear head (pooling or Flatten, then `Dense(K)`) on a frozen backbone is a
convex problem. Instead of a few Adam steps on unscaled features, this module
solves it:

1. Standardise the features on the rows given: subtract each column's mean,
   then divide by one number for all columns (the root-mean-square of their
   standard deviations; `scaling="global"`, the default) or by each column's
   own standard deviation (`scaling="per_feature"`, scikit-learn's
   `StandardScaler`). Constant columns are left at zero.
2. Minimise the L2-regularised loss, in scikit-learn's convention::

       C * sum_i s_i * loss(x_i W + b, y_i) + 0.5 * ||W||^2

   with `s_i` the sample weights and the intercept `b` not regularised.
   `loss` is the softmax cross-entropy ("classification"), the sum of
   independent sigmoid cross-entropies ("multilabel") or half the squared
   error ("regression", so that `C` is `1 / alpha` of a ridge regression).
   Classification and multilabel are solved by full-batch L-BFGS (SciPy) in
   float64 with analytic gradients; regression in closed form.
3. Pick `C` by k-fold cross-validation on the same rows (stratified for
   classification; leave-one-out for tiny data), by held-out accuracy with
   ties broken by the log-loss (log-loss for multilabel, mean squared error
   for regression), over a log grid from strong to weak regularisation. Up
   to 200 examples, classification pools the held-out scores of 3 more
   k-fold splits, each shuffled afresh (`repeats`).
4. Refit on every row with the chosen `C`.
5. Calibrate its confidence (classification and multilabel): scale all its
   logits by one factor t <= 1 so that its log-loss on the training rows
   equals the held-out log-loss cross-validation measured for that `C`.
6. Fold the standardisation (and t) into the weights, so that `kernel` and
   `bias` go straight into the `Dense(K)` layer that reads the raw features
   and outputs logits.

Why calibrate. Solved to convergence, a probe is far more confident on its
training rows than on new ones (training loss 0.04-0.15 against a held-out
0.29-0.37 on 100 yelp sentences with MiniLM), and fine-tuning that starts
from it gets little gradient from the rows it already fits. A factor on the
logits changes no predicted class, only the confidence: it makes the
probabilities honest and gives fine-tuning a head whose training loss is
what unseen data would show. Measured with `benchmarks/transfer_quality.py`
(defaults, 3 seeds, mean test accuracy after fine-tuning, calibrated against
not): yelp 0.890 against 0.884, 8 topics 0.854 against 0.854, 5-shot
textures 0.982 against 0.980, digits 0.797 against 0.775. This is
temperature scaling (Guo et al., 2017) with the temperature set from the
cross-validation the probe runs anyway; a large head norm after linear
probing is known to hold back the features' change during fine-tuning
(Tomihari and Sato, 2024).

Why one scale for all columns by default. A backbone's features are the
channels of one layer, in one unit: a channel that is nearly always 0 is
weak evidence, and the L2 penalty should treat it so. Per-feature
standardisation blows such channels up to unit variance, with their noise.
Measured here (mean test accuracy over seeds, same CV; global vs per
feature): 8 textures, 5 shots, VGG16 (hed) block-4 features flattened
0.825 vs 0.774; digits pixels, 50 and 100 examples 0.822 vs 0.790 and
0.892 vs 0.879; yelp sentences, MiniLM, 30 / 100 / 300 examples within
0.003. For tabular columns in unrelated units (scikit-learn's wine, breast
cancer) per-feature wins by far (0.95 vs 0.72): pass `scaling="per_feature"`.

How it stays cheap. The optimal `W` lies in the span of the (scaled)
training rows, and each fold's rows are a subset of all rows. So the problem
is solved, exactly, in the principal axes of the data: when N < D, the
eigenvectors of the N x N Gram matrix (a 30 x 25,088 problem becomes
30 x 30); otherwise, when D is moderate, of the D x D covariance. In those
axes the curvature of the loss is nearly diagonal, so L-BFGS runs on
coordinates rescaled by the Hessian's diagonal at its starting point (a
diagonal preconditioner): a fit takes tens of iterations (5x fewer than
without at N=30, D=25,088). The folds share no parameters, so for each C
they are fitted together as one problem (one L-BFGS run, one matrix product
per step for all folds): 4x faster for leave-one-out on 40 rows, 2x for 5
folds of 1,437 rows. Each fold starts from its solution at the previous C,
the final fit from the folds' mean at the chosen C, and above 5,000 rows C
is cross-validated on a stratified subset. Cross-validation fits stop at
a looser tolerance (their scores need 4 digits) with float32 products, and
the walk over C stops once the scores stop improving.

Example:
    >>> features = np.random.default_rng(0).normal(size=(60, 512))
    >>> labels = np.arange(60) % 10
    >>> probe = fit_linear_probe(features, labels, "classification", num_classes=10)
    >>> print(probe.report.summary())
    linear probe (classification, N=60, D=512, K=10): C=...
    >>> dense = keras.layers.Dense(10)
    >>> dense.build((None, 512))
    >>> dense.set_weights([probe.kernel, probe.bias])
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.special

from keras_transfer.errors import DataError
from keras_transfer.probe_solver import (
    REPEAT_MAX_EXAMPLES,
    REPEATS,
    _Basis,
    _cross_validate,
    _CrossValidation,
    _logit_scale,
    _Problem,
    _repeated_folds,
    _Solution,
    _standardize,
    _weighted_mean,
)

KINDS = ("classification", "multilabel", "regression")
SCALINGS = ("global", "per_feature")
SCORINGS = {
    "classification": ("accuracy", "log_loss"),
    "multilabel": ("log_loss",),
    "regression": ("mse",),
}
# Default grid of C, in units of 1 / (number of non-constant features): that is,
# C for features scaled so that the rows' mean squared norm is 1.
DEFAULT_GRID = tuple(np.logspace(-2.0, 4.0, 13))
REGRESSION_GRID = tuple(np.logspace(-4.0, 6.0, 41))  # closed form: many Cs are free
# Logit margin given to an output with no example of its class (or, for
# multi-label, with one value only) in the training rows: about e^-10.
_ABSENT_MARGIN = 10.0
# Products of (n, r) by (r, K) larger than this keep several BLAS threads.
_THREADED_WORK = 100_000_000


@dataclasses.dataclass(frozen=True)
class ProbeReport:
    """What `fit_linear_probe` chose and how long it took.

    Attributes:
        kind: "classification", "multilabel" or "regression".
        C: the inverse regularisation strength used for the final fit
            (scikit-learn's `C`, on the scaled features).
        grid: the values of `C` tried, ascending (one value when `C` was given).
        scoring: "log_loss", "accuracy" or "mse": what picked `C`.
        scaling: "global" or "per_feature": how the features were scaled.
        cv: how the rows were split: "5-fold stratified", "leave-one-out", ...
            or "none" when `C` was given.
        fold_scores: per fold (rows), per `C` (columns): the weighted mean
            held-out score of the fold.
        mean_scores: per `C`: the weighted mean held-out score over all rows.
        iterations: L-BFGS iterations, cross-validation's included (the
            folds fitted together for one C count once; 0 for regression,
            solved in closed form).
        final_iterations: L-BFGS iterations of the final fit.
        converged: whether the final fit converged.
        cv_unconverged: how many cross-validation fits stopped at `max_iter`.
        seconds: wall time of the whole call.
        held_out_log_loss: the cross-validated log-loss of the chosen `C`
            (NaN without cross-validation, and for regression).
        logit_scale: the factor t the logits were multiplied by so that the
            training log-loss equals `held_out_log_loss` (1.0: not scaled).
        training_log_loss: the training log-loss after that scaling (before
            it when t is 1; NaN for regression).
        solver: how it was solved, e.g. "lbfgs in Gram axes (r=30)".
        num_examples: N.
        num_features: D.
        num_outputs: K.
    """

    kind: str
    C: float
    grid: tuple[float, ...]
    scoring: str
    scaling: str
    cv: str
    fold_scores: tuple[tuple[float, ...], ...]
    mean_scores: tuple[float, ...]
    iterations: int
    final_iterations: int
    converged: bool
    cv_unconverged: int
    seconds: float
    held_out_log_loss: float
    logit_scale: float
    training_log_loss: float
    solver: str
    num_examples: int
    num_features: int
    num_outputs: int

    @property
    def best_score(self) -> float:
        """The mean held-out score of the chosen `C` (NaN when `C` was given)."""
        if not self.mean_scores:
            return math.nan
        return self.mean_scores[self.grid.index(self.C)]

    def summary(self) -> str:
        """One line: kind, chosen C, CV score, iterations, convergence, time."""
        if self.mean_scores:
            grid = f"{self.grid[0]:.3g}..{self.grid[-1]:.3g}, {len(self.grid)} values"
            cv = f"{self.cv} {self.scoring} {self.best_score:.4g} (grid {grid})"
        else:
            cv = "given, no cross-validation"
        state = "converged" if self.converged else "NOT converged"
        calibration = ""
        if self.logit_scale != 1.0:
            calibration = (f"; logits scaled by {self.logit_scale:.3g} so the training "
                           f"log-loss equals the held-out {self.training_log_loss:.3g}")
        return (
            f"linear probe ({self.kind}, N={self.num_examples}, D={self.num_features}, "
            f"K={self.num_outputs}): C={self.C:.4g} {cv}; {self.iterations} iterations, "
            f"{state}{calibration}; {self.seconds:.2f} s"
        )

    def as_dict(self) -> dict:
        """A JSON-ready dict (for a training history or metadata)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """Weights of a linear head on raw features: `logits = features @ kernel + bias`.

    Attributes:
        kernel: (D, K) float64, standardisation folded in.
        bias: (K,) float64.
        kind: "classification", "multilabel" or "regression".
        report: what was chosen, see `ProbeReport`.
    """

    kernel: np.ndarray
    bias: np.ndarray
    kind: str
    report: ProbeReport

    def logits(self, features) -> np.ndarray:
        """The Dense layer's output for `features` of shape (N, ...) (flattened)."""
        x = np.asarray(features, dtype=np.float64)
        return x.reshape(len(x), -1) @ self.kernel + self.bias

    def predict(self, features) -> np.ndarray:
        """Softmax probabilities, sigmoid probabilities or regression values."""
        z = self.logits(features)
        if self.kind == "classification":
            return scipy.special.softmax(z, axis=1)
        if self.kind == "multilabel":
            return scipy.special.expit(z)
        return z


def fit_linear_probe(
    features,
    targets,
    kind: str = "classification",
    num_classes: int | None = None,
    *,
    sample_weight=None,
    regularization: float | str = "auto",
    folds: int = 5,
    repeats: int | str = "auto",
    seed: int = 0,
    scoring: str | None = None,
    scaling: str = "global",
    grid: Sequence[float] | None = None,
    calibrate: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> LinearProbe:
    """Fits a linear head to convergence on frozen features, with C picked by CV.

    Args:
        features: array of shape (N, D), or (N, ...) flattened in C order as
            `keras.layers.Flatten` does; any float dtype, a `np.memmap` is fine
            (it is read once into a float64 copy: N * D * 8 bytes).
        targets: "classification": integer labels (N,) in [0, num_classes), or
            one-hot (N, K). "multilabel": 0/1 array (N, K). "regression":
            float array (N,) or (N, K).
        kind: "classification" (softmax, also for 2 classes: the head has K
            outputs), "multilabel" (a sigmoid per output) or "regression"
            (least squares).
        num_classes: int. The number of outputs K of the head. Inferred from
            `targets` when None.
        sample_weight: optional (N,) non-negative weights (e.g. class weights
            looked up per example); they weight the loss and the CV scores.
        regularization: "auto" to pick C by cross-validation, or a positive
            float: C itself (scikit-learn's convention, larger is weaker).
        folds: int. Number of cross-validation folds. Stratified by label for
            classification; leave-one-out up to 50 examples; above 5,000
            examples on a stratified subset of 5,000 (the final fit uses all).
            A class with fewer members than folds is held out in fewer folds.
        repeats: "auto" or int. How many more k-fold splits, each shuffled
            afresh, score every C besides the first split; the held-out
            scores are pooled over all splits. "auto": 3 for classification
            up to 200 examples (where one split's accuracy moves by whole rows
            and the fits are cheap), else 0. Measured on cached features
            (test accuracy, mean of 3 seeds of the splits of
            `benchmarks/transfer_quality.py`, one split against 3 more):
            digits with 10 per class 0.734 vs 0.736, with 5 per class 0.627
            vs 0.628, 5-shot textures 0.986 vs 0.984, yelp 0.866 vs 0.865,
            5-shot photographs 0.999 both (scikit-learn's
            `LogisticRegression()` on standardised features: 0.682, 0.589,
            0.967, 0.847, 0.998); on 6 other draws of digits, 0.701 vs 0.708
            (10 per class) and 0.617 vs 0.620 (5). Choosing by held-out
            log-loss, or by a one-standard-error rule on it, was no better
            (digits 0.701-0.707 and 0.612-0.615; yelp 0.853-0.856).
        seed: int. Seeds the assignment of rows to folds; nothing else is random.
        scoring: what picks C: "accuracy" (default for classification: the
            held-out accuracy, its many ties on small data broken by the
            held-out log-loss), "log_loss" (default for multilabel; also for
            classification) or "mse" (regression). Measured (mean test
            accuracy, one scale for all columns; accuracy with log-loss ties
            vs log-loss alone vs scikit-learn's LogisticRegression() on the
            raw features): yelp/MiniLM with 30 examples (12 seeds) 0.823 vs
            0.819 vs 0.822, with 100 examples (6 seeds) 0.858 vs 0.849 vs
            0.856; digits with 50 and 100 examples (12 seeds) 0.857 vs 0.856
            vs 0.858 and 0.897 vs 0.895 vs 0.896. (Accuracy with ties going
            to the stronger regularisation was worse than the log-loss: yelp
            with 30 examples 0.750 vs 0.777.) A one-standard-error rule was
            measured too: +0.003 at yelp with 100 examples, -0.045 with 30:
            not used.
        scaling: "global" (default: centre each column, divide all by one
            number, which keeps the backbone's relative feature scales) or
            "per_feature" (divide each column by its standard deviation, for
            columns in unrelated units). See the module docstring for measures.
        grid: values of C to try, on the scaled features. Default:
            `DEFAULT_GRID` (13 values from 1e-2 to 1e4, or 41 from 1e-4 to 1e6
            for regression) divided by the number of non-constant features,
            that is, C for features scaled to unit mean squared row norm. The
            log-loss walk from strong to weak stops after `PATIENCE` values
            without improvement.
        calibrate: bool. Classification and multilabel with C picked by
            cross-validation: scale the final logits by one factor t <= 1
            so that the training log-loss equals the held-out log-loss
            of the chosen C (see the module docstring; the predicted classes
            do not change). False: the solution as solved, as scikit-learn
            gives it. Nothing is scaled when `regularization` is a number.
        max_iter: int. L-BFGS iteration limit per fit.
        tol: float. L-BFGS stops when every coordinate of the gradient,
            preconditioned by the diagonal of the Hessian, is below `tol`
            (about sqrt(2 * (f - f*)) per coordinate, f the loss averaged over
            rows plus the penalty). Cross-validation fits use 100 * tol.

    Returns:
        A `LinearProbe`: `kernel` (D, K) and `bias` (K,) in logits space for
        a `Dense(K)` on raw features, and `report`.

    Raises:
        DataError: features or targets that cannot be used (wrong shapes,
            NaN or infinite values, labels out of range, fewer than 2 rows).
        ValueError: an unknown `kind` or `scoring`, or a bad `regularization`,
            `folds` or `grid`.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(60, 512))
        >>> y = np.arange(60) % 3
        >>> probe = fit_linear_probe(x, y, "classification", num_classes=3)
        >>> probe.report.summary()
        'linear probe (classification, N=60, D=512, K=3): C=...'
    """
    start = time.perf_counter()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; received kind={kind!r}.")
    scoring = scoring or SCORINGS[kind][0]
    if scoring not in SCORINGS[kind]:
        raise ValueError(
            f"scoring for kind={kind!r} must be one of {SCORINGS[kind]}; "
            f"received scoring={scoring!r}."
        )
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}; received scaling={scaling!r}.")
    if not (isinstance(folds, (int, np.integer)) and folds >= 2):
        raise ValueError(f"folds must be an integer >= 2; received folds={folds!r}.")
    if not (isinstance(repeats, str) and repeats == "auto") and (
            isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer))
            or repeats < 0):
        raise ValueError(
            f"repeats must be 'auto' or an integer >= 0; received repeats={repeats!r}.")
    x = _check_features(features)
    n, d = x.shape
    y, k = _check_targets(targets, kind, num_classes, n)
    weights = _check_sample_weight(sample_weight, n)
    fixed_c = _check_regularization(regularization)

    xs, mean, scale, constant = _standardize(x, scaling)
    del x
    # LAPACK's eigensolver (the basis) is mostly memory-bound: a second BLAS thread saved
    # 0.1 s on 1,200 rows, and where the cores are shared it ran 8x slower (0.36 s -> 2.9 s).
    with _blas_threads(0):
        basis = _Basis(xs)
    del xs  # the basis keeps it only where it needs it
    effective_features = max(float(basis.eigenvalues.sum() / n), 1e-12)
    if fixed_c is not None:
        cs = (fixed_c,)
    elif grid is not None:
        cs = _check_grid(grid)
    else:
        cs = tuple(float(c) / effective_features
                   for c in (REGRESSION_GRID if kind == "regression" else DEFAULT_GRID))

    problem = _Problem(kind, basis.z, y, k, weights, max_iter, tol)
    if fixed_c is not None:
        cv, validation = "none", _CrossValidation(fixed_c, cs, (), (), None, 0, 0, math.nan)
    else:
        if isinstance(repeats, str):  # "auto"
            repeats = REPEATS if kind == "classification" and n <= REPEAT_MAX_EXAMPLES else 0
        fold_of, cv = _repeated_folds(n, y if kind == "classification" else None, folds, seed,
                                      repeats)
        with _blas_threads(np.count_nonzero(fold_of >= 0) * problem.r * k):
            validation = _cross_validate(problem, fold_of, cs, scoring)
    chosen = validation.chosen
    with _blas_threads(n * problem.r * k):
        solution = problem.fit(np.arange(n), chosen, validation.warm)
    logit_scale, training_loss = 1.0, math.nan
    if kind != "regression":
        if calibrate:
            logit_scale = _logit_scale(problem, solution, validation.held_out_log_loss)
            solution = dataclasses.replace(solution, coef=solution.coef * logit_scale,
                                           intercept=solution.intercept * logit_scale)
        training_loss = _weighted_mean(problem.losses(solution, np.arange(n), "log_loss"),
                                       weights)
    if not solution.converged:
        warnings.warn(
            f"The linear probe's final fit did not converge in max_iter={max_iter} "
            f"iterations (C={chosen:.4g}); raise max_iter or use a smaller C.",
            RuntimeWarning, stacklevel=2)
    intercept = _finite_intercept(solution, kind, stacklevel=2)

    # Back to raw features: W = V B on the scaled features, then fold the scaling.
    kernel = basis.to_kernel(solution.coef) / scale[:, None]
    kernel[constant] = 0.0  # exactly, not rounding error of the rotation
    bias = intercept - mean @ kernel
    report = ProbeReport(
        kind=kind,
        C=float(chosen),
        grid=tuple(float(c) for c in validation.cs),
        scoring=scoring,
        scaling=scaling,
        cv=cv,
        fold_scores=tuple(tuple(float(s) for s in row) for row in validation.fold_scores),
        mean_scores=tuple(float(s) for s in validation.mean_scores),
        iterations=int(validation.iterations + solution.iterations),
        final_iterations=int(solution.iterations),
        converged=bool(solution.converged),
        cv_unconverged=int(validation.unconverged),
        seconds=time.perf_counter() - start,
        held_out_log_loss=validation.held_out_log_loss,
        logit_scale=float(logit_scale),
        training_log_loss=training_loss,
        solver=("ridge" if kind == "regression" else "lbfgs") + f" in {basis.name}",
        num_examples=n,
        num_features=d,
        num_outputs=k,
    )
    return LinearProbe(kernel=kernel, bias=bias, kind=kind, report=report)


def _finite_intercept(solution: _Solution, kind: str, stacklevel: int) -> np.ndarray:
    """The intercept with outputs that never vary in the rows set to a finite margin."""
    intercept = solution.intercept.copy()
    absent = solution.absent
    if not absent:
        return intercept
    if kind == "classification":
        seen = intercept[np.isfinite(intercept)]
        intercept[absent] = (seen.min() if seen.size else 0.0) - _ABSENT_MARGIN
        what = "have no example"
    else:
        intercept[absent] = np.sign(intercept[absent]) * _ABSENT_MARGIN
        what = "take one value only (all 0 or all 1)"
    warnings.warn(
        f"Outputs {absent} of the linear probe {what} in the training rows (kind={kind!r}): "
        f"they get a zero kernel and a constant logit ({_ABSENT_MARGIN:g} below the lowest "
        f"other logit at the mean features for classes, +/-{_ABSENT_MARGIN:g} for labels).",
        RuntimeWarning, stacklevel=stacklevel + 1)
    return intercept


def _blas_threads(work: int):
    """One BLAS thread while the solver multiplies small matrices.

    L-BFGS multiplies an (n, r) by an (r, K) matrix thousands of times. Below
    about 1e8 multiply-adds, a second thread saves little, and where the
    cores are shared (as on a busy machine) threads waiting for each other
    made it up to 7x slower. Larger products keep every thread.
    """
    if work > _THREADED_WORK:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits  # lazy: optional (comes with scikit-learn)
    except ImportError:  # optional: without it, BLAS keeps its own setting
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# --- Input checks -------------------------------------------------------------


def _check_features(features) -> np.ndarray:
    x = features if isinstance(features, np.ndarray) else np.asarray(features)
    if x.ndim < 2:
        raise DataError(
            f"features must have shape (N, D) (or (N, ...), flattened); received shape "
            f"{x.shape}. For one feature per example, pass features.reshape(-1, 1).")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"features must be numbers; received dtype {x.dtype}.")
    if x.ndim > 2:
        x = x.reshape(len(x), -1)  # as keras.layers.Flatten: C order
    if x.shape[0] < 2:
        raise DataError(
            f"A linear probe needs at least 2 examples; received features of shape "
            f"{x.shape}.")
    if x.shape[1] == 0:
        raise DataError(f"features have no columns; received shape {x.shape}.")
    return x


def _as_rows(targets, n: int, name: str = "targets") -> np.ndarray:
    t = np.asarray(targets)
    if t.ndim == 0 or len(t) != n:
        raise DataError(
            f"features have {n} rows but {name} has shape {t.shape}: they must have "
            f"one entry per row.")
    return t


def _check_targets(targets, kind: str, num_classes: int | None, n: int):
    t = _as_rows(targets, n)
    if num_classes is not None and not (
            isinstance(num_classes, (int, np.integer)) and num_classes >= 1):
        raise ValueError(f"num_classes must be a positive integer; received {num_classes!r}.")
    if t.dtype == object or not (np.issubdtype(t.dtype, np.number) or t.dtype == bool):
        raise DataError(f"{kind} targets must be numbers; received dtype {t.dtype}.")
    if not np.all(np.isfinite(t)):
        bad = np.flatnonzero(~np.isfinite(t.reshape(n, -1)).all(axis=1))
        raise DataError(
            f"targets contain NaN or infinite values (rows {bad[:5].tolist()} of {n}).")
    if kind == "classification":
        return _check_labels(t, num_classes, n)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise DataError(
            f"{kind} targets must have shape (N,) or (N, K); received shape {t.shape}.")
    k = t.shape[1]
    if num_classes is not None and num_classes != k:
        raise DataError(
            f"num_classes={num_classes} but the {kind} targets have {k} columns "
            f"(shape {t.shape}).")
    if kind == "multilabel" and not np.isin(t, (0, 1)).all():
        bad = np.unique(t[~np.isin(t, (0, 1))])[:5].tolist()
        raise DataError(
            f"multilabel targets must be 0 or 1; received values such as {bad}.")
    return t.astype(np.float64), k


def _check_labels(t: np.ndarray, num_classes: int | None, n: int):
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    elif t.ndim == 2:  # one-hot rows
        if not (np.isin(t, (0, 1)).all() and (t.sum(axis=1) == 1).all()):
            raise DataError(
                f"classification targets of shape {t.shape} must be one-hot rows "
                f"(or pass integer labels of shape (N,)).")
        if num_classes is not None and num_classes != t.shape[1]:
            raise DataError(
                f"num_classes={num_classes} but the one-hot targets have "
                f"{t.shape[1]} columns.")
        num_classes = t.shape[1]
        t = t.argmax(axis=1)
    if t.ndim != 1:
        raise DataError(
            f"classification targets must be integer labels of shape (N,); received "
            f"shape {t.shape}.")
    if not np.all(t == np.round(t)):
        bad = np.unique(t[t != np.round(t)])[:5].tolist()
        raise DataError(f"classification labels must be integers; received {bad}.")
    labels = t.astype(np.int64)
    k = num_classes if num_classes is not None else max(int(labels.max()) + 1, 2)
    if k < 2:
        raise DataError(
            f"classification needs num_classes >= 2; received num_classes={k}. "
            f"For a single 0/1 output, use kind='multilabel'.")
    bad = np.unique(labels[(labels < 0) | (labels >= k)])
    if bad.size:
        raise DataError(
            f"classification labels must be in [0, {k}) for num_classes={k}; received "
            f"labels {bad[:5].tolist()} ({np.count_nonzero((labels < 0) | (labels >= k))} "
            f"rows).")
    return labels, k


def _check_sample_weight(sample_weight, n: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n)
    w = _as_rows(sample_weight, n, "sample_weight").astype(np.float64)
    if w.ndim == 2 and w.shape[1] == 1:
        w = w[:, 0]
    if w.ndim != 1:
        raise DataError(f"sample_weight must have shape (N,); received shape {w.shape}.")
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise DataError(
            f"sample_weight must be finite, non-negative and not all zero; received "
            f"min {np.min(w):g}, max {np.max(w):g}, sum {np.sum(w):g}.")
    return w


def _check_regularization(regularization) -> float | None:
    if isinstance(regularization, str) and regularization == "auto":
        return None
    if (isinstance(regularization, (int, float, np.number)) and not isinstance(regularization, bool)
            and np.isfinite(regularization) and regularization > 0):
        return float(regularization)
    raise ValueError(
        f"regularization must be 'auto' or a positive number (C, the inverse "
        f"strength); received {regularization!r}.")


def _check_grid(grid) -> tuple[float, ...]:
    cs = np.asarray(grid, dtype=np.float64).ravel()
    if cs.size == 0 or not np.all(np.isfinite(cs)) or (cs <= 0).any():
        raise ValueError(f"grid must hold positive values of C; received {grid!r}.")
    return tuple(float(c) for c in np.unique(cs))  # sorted: strong to weak
