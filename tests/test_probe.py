"""Tests of the linear probe: optimum, folding, cross-validation, inputs."""

import json
import warnings

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import expit
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, Ridge
from sklearn.preprocessing import StandardScaler

from keras_transfer import probe as probe_module
from keras_transfer import probe_solver
from keras_transfer.errors import DataError
from keras_transfer.probe import LinearProbe, fit_linear_probe


def blobs(n, d, k, seed=0, spread=1.0, scale=None):
    """Gaussian classes around random centres, features of mixed scales and offsets."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = rng.normal(size=(k, d))[y] * spread + rng.normal(size=(n, d))
    scale = rng.uniform(0.01, 100.0, d) if scale is None else scale
    return x * scale + rng.normal(size=d) * 10 * scale, y


def standardized(x):
    return StandardScaler().fit_transform(np.asarray(x, dtype=np.float64))


def standardized_kernel(probe, x):
    """The probe's kernel on standardised features (undoing the folding)."""
    return probe.kernel * np.asarray(x, dtype=np.float64).std(axis=0)[:, None]


# --- The optimum -----------------------------------------------------------------------


@pytest.mark.parametrize("n, d", [(300, 20), (40, 120)], ids=["primal axes", "Gram axes"])
def test_softmax_matches_sklearn_for_the_same_c(n, d):
    x, y = blobs(n, d, 4, spread=0.7)
    xs = standardized(x)
    for c in (0.01, 1.0):
        probe = fit_linear_probe(x, y, "classification", 4, regularization=c, tol=1e-9,
                                 scaling="per_feature")
        ref = LogisticRegression(C=c, tol=1e-12, max_iter=100_000).fit(xs, y)
        np.testing.assert_allclose(probe.predict(x), ref.predict_proba(xs), atol=1e-6)
        np.testing.assert_allclose(standardized_kernel(probe, x), ref.coef_.T,
                                   atol=1e-5 * np.abs(ref.coef_).max())
        assert probe.report.converged


def test_unrotated_route_matches_sklearn(monkeypatch):
    """Large D with N >= D skips the rotation; the solution must be the same."""
    monkeypatch.setattr(probe_solver, "_COVARIANCE_MAX_FEATURES", 5)
    x, y = blobs(200, 30, 3, spread=0.5)
    probe = fit_linear_probe(x, y, "classification", 3, regularization=0.3, tol=1e-9,
                             scaling="per_feature")
    assert probe.report.solver == "lbfgs in feature axes"
    xs = standardized(x)
    ref = LogisticRegression(C=0.3, tol=1e-12, max_iter=100_000).fit(xs, y)
    np.testing.assert_allclose(probe.predict(x), ref.predict_proba(xs), atol=1e-6)


def test_two_classes_stay_softmax_and_match_logistic_regression_at_twice_c():
    """Softmax with 2 outputs and C equals a sigmoid on the logit difference with 2C."""
    x, y = blobs(120, 6, 2, spread=0.4)
    probe = fit_linear_probe(x, y, "classification", 2, regularization=0.05, tol=1e-9,
                             scaling="per_feature")
    assert probe.kernel.shape == (6, 2) and probe.bias.shape == (2,)
    xs = standardized(x)
    ref = LogisticRegression(C=0.1, tol=1e-12, max_iter=100_000).fit(xs, y)
    np.testing.assert_allclose(probe.predict(x)[:, 1], ref.predict_proba(xs)[:, 1], atol=1e-6)
    np.testing.assert_allclose(probe.kernel[:, 0], -probe.kernel[:, 1], atol=1e-10)


def test_multilabel_matches_independent_logistic_regressions():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(150, 8)) * [1, 2, 3, 4, 5, 6, 7, 8] + 4
    y = (x @ rng.normal(size=(8, 3)) + rng.normal(size=(150, 3)) * 3 > 0).astype(int)
    probe = fit_linear_probe(x, y, "multilabel", regularization=0.2, tol=1e-9,
                             scaling="per_feature")
    xs = standardized(x)
    for j in range(3):
        ref = LogisticRegression(C=0.2, tol=1e-12, max_iter=100_000).fit(xs, y[:, j])
        np.testing.assert_allclose(probe.predict(x)[:, j], ref.predict_proba(xs)[:, 1], atol=1e-6)


@pytest.mark.parametrize("n, d", [(80, 10), (15, 40)], ids=["N > D", "N < D"])
def test_ridge_matches_sklearn_with_sample_weights(n, d):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, d) + 3
    y = x @ rng.normal(size=(d, 2)) + rng.normal(size=(n, 2))
    w = rng.uniform(0.2, 3.0, n)
    probe = fit_linear_probe(x, y, "regression", regularization=0.5, sample_weight=w,
                             scaling="per_feature")
    xs = standardized(x)
    ref = Ridge(alpha=1 / 0.5).fit(xs, y, sample_weight=w)
    np.testing.assert_allclose(probe.predict(x), ref.predict(xs), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(standardized_kernel(probe, x), ref.coef_.T, rtol=1e-7, atol=1e-9)


def test_one_dimensional_problem_reaches_its_known_optimum():
    """x = 3 +/- 2 (standardised: +/-1), a share q of positives at +1 and 1 - q at -1.

    By symmetry the standardised intercept is 0, and the weight w solves
    C * n * (sigmoid(w) - q) + w = 0; pick C so that w = 1 exactly.
    """
    n, q, w_star = 40, 0.8, 1.0
    x = np.repeat([5.0, 1.0], n // 2)[:, None]
    y = np.concatenate([np.arange(n // 2) < q * n / 2, np.arange(n // 2) >= q * n / 2])
    c = -w_star / (n * (expit(w_star) - q))
    probe = fit_linear_probe(x, y.astype(int), "multilabel", regularization=c, tol=1e-10)
    assert probe.kernel[0, 0] == pytest.approx(w_star / 2, rel=1e-6)  # std is 2
    assert probe.bias[0] == pytest.approx(-3 * w_star / 2, rel=1e-6)
    # Softmax with 2 outputs at C / 2 is the same problem on the logit difference.
    soft = fit_linear_probe(x, y.astype(int), "classification", 2, regularization=c / 2, tol=1e-10)
    assert soft.kernel[0, 1] - soft.kernel[0, 0] == pytest.approx(w_star / 2, rel=1e-6)
    # And a C read off the equation for another w gives that w.
    w_other = brentq(lambda w: 5.0 * n * (expit(w) - q) + w, 0.0, 10.0)
    other = fit_linear_probe(x, y.astype(int), "multilabel", regularization=5.0, tol=1e-10)
    assert other.kernel[0, 0] * 2 == pytest.approx(w_other, rel=1e-6)


def test_separable_data_reaches_full_training_accuracy_with_weak_regularization():
    x, y = blobs(60, 5, 3, spread=8.0)
    probe = fit_linear_probe(x, y, "classification", 3, regularization=1e4)
    assert (probe.logits(x).argmax(axis=1) == y).all()
    assert probe.report.converged
    strong = fit_linear_probe(x, y, "classification", 3, regularization=1e-6)
    np.testing.assert_allclose(strong.predict(x), 1 / 3, atol=1e-3)  # weights shrink to 0


# --- Folding the standardisation ---------------------------------------------------------


@pytest.mark.parametrize("scaling", ["global", "per_feature"])
def test_folded_weights_give_the_logits_of_the_standardised_problem(scaling):
    """Fitting on x or on an affine map of x gives the same logits: per column for
    per-feature scaling, one factor and per-column shifts for global scaling."""
    x, y = blobs(90, 12, 3, spread=0.6)
    rng = np.random.default_rng(5)
    scale = rng.uniform(1e-3, 1e3, 12) if scaling == "per_feature" else 250.0
    shift = rng.normal(size=12) * 1e3
    a = fit_linear_probe(x, y, "classification", 3, regularization=0.7, tol=1e-9, scaling=scaling)
    b = fit_linear_probe(x * scale + shift, y, "classification", 3, regularization=0.7, tol=1e-9,
                         scaling=scaling)
    np.testing.assert_allclose(a.logits(x), b.logits(x * scale + shift), atol=1e-6)


def test_global_scaling_matches_sklearn_on_centred_features_over_one_scale():
    x, y = blobs(120, 10, 3, spread=0.5)
    probe = fit_linear_probe(x, y, "classification", 3, regularization=0.3, tol=1e-9)
    assert probe.report.scaling == "global"
    centred = x - x.mean(axis=0)
    scaled = centred / np.sqrt(np.mean(centred.var(axis=0)))
    ref = LogisticRegression(C=0.3, tol=1e-12, max_iter=100_000).fit(scaled, y)
    np.testing.assert_allclose(probe.predict(x), ref.predict_proba(scaled), atol=1e-6)
    # Per-feature scaling is a different problem here (columns of scales 0.01 to 100).
    other = fit_linear_probe(x, y, "classification", 3, regularization=0.3, scaling="per_feature")
    assert np.abs(other.predict(x) - probe.predict(x)).max() > 1e-2


def test_folded_weights_go_into_a_keras_dense_layer():
    keras = pytest.importorskip("keras")
    x, y = blobs(90, 12, 3, spread=0.6, scale=np.full(12, 30.0))
    x = np.maximum(x, 0).astype("float32")  # ReLU-like features in the hundreds
    probe = fit_linear_probe(x, y, "classification", 3, regularization=0.7,
                             scaling="per_feature")
    dense = keras.layers.Dense(3)
    dense.build((None, 12))
    dense.set_weights([probe.kernel, probe.bias])
    ref = LogisticRegression(C=0.7, tol=1e-12, max_iter=100_000).fit(standardized(x), y)
    logits = keras.ops.convert_to_numpy(dense(x))
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
    np.testing.assert_allclose(probs, ref.predict_proba(standardized(x)), atol=1e-4)


def test_one_hot_targets_and_integer_labels_give_the_same_probe():
    x, y = blobs(60, 5, 3, spread=0.5)
    a = fit_linear_probe(x, y, "classification", 3)
    b = fit_linear_probe(x, np.eye(3)[y], "classification")
    np.testing.assert_array_equal(a.kernel, b.kernel)
    assert b.report.num_outputs == 3


def test_constant_columns_get_zero_weight_and_nd_features_are_flattened():
    x, y = blobs(50, 12, 2, spread=0.5)
    x[:, 3] = 7.0
    probe = fit_linear_probe(x.reshape(50, 2, 2, 3), y, "classification", 2, regularization=1.0)
    flat = fit_linear_probe(x, y, "classification", 2, regularization=1.0)
    np.testing.assert_array_equal(probe.kernel[3], 0.0)
    np.testing.assert_allclose(probe.kernel, flat.kernel)
    np.testing.assert_allclose(probe.logits(x.reshape(50, 2, 2, 3)), flat.logits(x))


@pytest.mark.parametrize("scaling", ["global", "per_feature"])
@pytest.mark.parametrize("factor", [1e200, 1e-200])
def test_features_of_extreme_scale_give_the_same_probe(factor, scaling):
    """Squaring 1e200 overflows and 1e-200 underflows float64: the probe must not care."""
    x, y = blobs(60, 8, 3, spread=0.5, scale=np.ones(8))
    ref = fit_linear_probe(x, y, "classification", 3, scaling=scaling, grid=[0.1, 10.0])
    probe = fit_linear_probe(x * factor, y, "classification", 3, scaling=scaling,
                             grid=[0.1, 10.0])
    assert probe.report.C == pytest.approx(ref.report.C, rel=1e-9)
    np.testing.assert_allclose(probe.kernel * factor, ref.kernel, rtol=1e-6,
                               atol=1e-9 * np.abs(ref.kernel).max())
    np.testing.assert_allclose(probe.logits(x * factor), ref.logits(x), atol=1e-6)
    if scaling == "per_feature":  # one column of another scale: the same problem
        mixed = x.copy()
        mixed[:, 0] *= factor
        a = fit_linear_probe(mixed, y, "classification", 3, scaling=scaling, regularization=0.5)
        b = fit_linear_probe(x, y, "classification", 3, scaling=scaling, regularization=0.5)
        np.testing.assert_allclose(a.logits(mixed), b.logits(x), atol=1e-6)


def test_memmap_features(tmp_path):
    x, y = blobs(60, 8, 3, spread=0.5)
    mapped = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32,
                                       shape=x.shape)
    mapped[:] = x
    probe = fit_linear_probe(mapped, y, "classification", 3, regularization=1.0)
    ref = fit_linear_probe(x.astype(np.float32), y, "classification", 3, regularization=1.0)
    np.testing.assert_allclose(probe.kernel, ref.kernel)
    np.testing.assert_array_equal(mapped, x.astype(np.float32))  # not modified


# --- Cross-validation --------------------------------------------------------------------


def test_cross_validation_is_deterministic_for_a_seed():
    x, y = blobs(150, 10, 3, spread=0.3)
    a = fit_linear_probe(x, y, "classification", 3, seed=1)
    b = fit_linear_probe(x, y, "classification", 3, seed=1)
    c = fit_linear_probe(x, y, "classification", 3, seed=2)
    assert a.report.C == b.report.C and a.report.fold_scores == b.report.fold_scores
    np.testing.assert_array_equal(a.kernel, b.kernel)
    assert a.report.fold_scores != c.report.fold_scores
    # 150 rows: the first split and 3 more, every fold of each reported.
    assert a.report.cv == "5-fold stratified + 3 x 5-fold stratified"
    assert len(a.report.fold_scores) == 20
    assert fit_linear_probe(x, y, "classification", 3, seed=1, repeats=0).report.cv == (
        "5-fold stratified")
    assert len(a.report.mean_scores) == len(a.report.grid) == len(a.report.fold_scores[0])
    assert a.report.C in a.report.grid
    assert a.report.scoring == "accuracy"  # higher is better
    assert a.report.mean_scores[a.report.grid.index(a.report.C)] == max(a.report.mean_scores)
    by_loss = fit_linear_probe(x, y, "classification", 3, seed=1, scoring="log_loss")
    assert by_loss.report.mean_scores[by_loss.report.grid.index(by_loss.report.C)] == min(
        by_loss.report.mean_scores)


@pytest.mark.parametrize("kind", ["classification", "multilabel", "regression"])
def test_every_kind_picks_the_best_c_of_its_grid(kind):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(120, 6)) * 20 + 50
    signal = (x - 50) @ rng.normal(size=(6, 3)) / 20
    targets = {
        "classification": signal.argmax(axis=1),
        "multilabel": (signal + rng.normal(size=signal.shape) > 0).astype(int),
        "regression": signal + 0.1 * rng.normal(size=signal.shape),
    }[kind]
    probe = fit_linear_probe(x, targets, kind)
    report = probe.report
    assert report.scoring == {"regression": "mse", "classification": "accuracy"}.get(kind, "log_loss")
    best = max if report.scoring == "accuracy" else min  # accuracy: higher is better
    assert report.mean_scores[report.grid.index(report.C)] == best(report.mean_scores)
    assert probe.kernel.shape == (6, 3) and probe.bias.shape == (3,)
    if kind == "regression":
        assert np.mean((probe.predict(x) - targets) ** 2) < 0.05
        assert len(report.grid) == len(probe_module.REGRESSION_GRID)
    else:
        assert report.converged and report.cv_unconverged == 0
        truth = targets if kind == "multilabel" else np.eye(3)[targets]
        assert ((probe.predict(x) > 0.5) == truth).mean() > 0.8


@pytest.mark.parametrize("kind", ["classification", "multilabel"])
def test_folds_fitted_together_reach_each_folds_own_optimum(kind):
    """One L-BFGS run over every fold gives what fitting each fold alone gives, with
    classes absent from a fold's rows (softmax) and outputs constant over them."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(24, 5))
    if kind == "classification":  # class 3 has one row: absent from one fold, alone in none
        y = np.array([0, 1, 2] * 7 + [0, 1, 3])
    else:  # output 2 is 1 on one row only
        y = (z[:, :3] + rng.normal(size=(24, 3)) > 0).astype(float)
        y[:, 2] = 0.0
        y[5, 2] = 1.0
    weights = rng.uniform(0.5, 2.0, 24)
    problem = probe_solver._Problem(kind, z, y, 4 if kind == "classification" else 3,
                                    weights, 1000, 1e-10)
    row_sets = [np.delete(np.arange(24), held) for held in (5, 23, 0)] + [np.arange(12)]
    together = problem.fit_folds(row_sets, 0.5, [None] * 4)
    for rows, solution in zip(row_sets, together):
        alone = problem.fit(rows, 0.5)
        np.testing.assert_allclose(solution.coef, alone.coef, atol=1e-6)
        np.testing.assert_array_equal(np.isfinite(solution.intercept),
                                      np.isfinite(alone.intercept))
        finite = np.isfinite(alone.intercept)
        np.testing.assert_allclose(solution.intercept[finite], alone.intercept[finite], atol=1e-6)
        np.testing.assert_array_equal(solution.intercept[~finite], alone.intercept[~finite])
    # The fold without row 23 has no example of class 3 (or no positive of output 2
    # without row 5): no weight on it and a certain intercept.
    missing = 1 if kind == "classification" else 0
    assert np.all(together[missing].coef[:, -1 if kind == "classification" else 2] == 0)
    assert together[missing].intercept[-1 if kind == "classification" else 2] == -np.inf


def test_stratified_folds_spread_every_class():
    labels = np.repeat([0, 1, 2], [50, 20, 3])
    fold_of, cv = probe_solver._assign_folds(len(labels), labels, 5, seed=0)
    assert cv == "5-fold stratified"
    sizes = np.bincount(fold_of)
    assert sizes.max() - sizes.min() <= 1
    for k, count in enumerate((50, 20, 3)):
        per_fold = np.bincount(fold_of[labels == k], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == count


def test_large_data_cross_validates_a_stratified_subset(monkeypatch):
    monkeypatch.setattr(probe_solver, "CV_MAX_EXAMPLES", 100)
    labels = np.repeat([0, 1, 2], [200, 80, 20])
    fold_of, cv = probe_solver._assign_folds(len(labels), labels, 5, seed=0)
    assert cv == "5-fold stratified on 100 of 300 rows"
    assert np.count_nonzero(fold_of >= 0) == 100
    np.testing.assert_allclose(np.bincount(labels[fold_of >= 0]), [66.7, 26.7, 6.7], atol=1)
    x, y = blobs(300, 5, 3, spread=0.5)
    probe = fit_linear_probe(x, y, "classification", 3)
    assert probe.report.cv == "5-fold stratified on 100 of 300 rows"
    assert np.isfinite(probe.report.mean_scores).all() and probe.report.converged


def test_cv_scores_are_held_out_scores():
    """The reported mean score of each C is the pooled held-out MSE of ridge on the folds."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(80, 5))
    y = x @ rng.normal(size=5) + rng.normal(size=80)
    probe = fit_linear_probe(x, y, "regression", grid=[0.01, 1.0], seed=3, scaling="per_feature")
    fold_of, _ = probe_solver._assign_folds(80, None, 5, seed=3)
    xs = standardized(x)
    for c, score in zip(probe.report.grid, probe.report.mean_scores):
        errors = np.empty(80)
        for f in range(5):
            held = fold_of == f
            ref = Ridge(alpha=1 / c).fit(xs[~held], y[~held])
            errors[held] = (ref.predict(xs[held]) - y[held]) ** 2
        assert score == pytest.approx(errors.mean(), rel=1e-8)


def test_repeated_splits_pool_the_held_out_accuracy_of_every_split():
    """With repeats, the score of C is the held-out accuracy over every fold of every split:
    leave-one-out on 20 rows, then 2 stratified 5-fold splits shuffled afresh."""
    x, y = blobs(20, 6, 4, spread=0.5)
    grid = [0.01, 1.0]
    probe = fit_linear_probe(x, y, "classification", 4, grid=grid, repeats=2, seed=3)
    assert probe.report.cv == "leave-one-out + 2 x 5-fold stratified"
    fold_of, _ = probe_solver._repeated_folds(20, y, 5, 3, 2)
    assert fold_of.shape == (3, 20) and not np.array_equal(fold_of[1], fold_of[2])
    for split in fold_of[1:]:  # stratified: each class of 5 spread 1 per fold
        assert (np.bincount(split[y == 0], minlength=5) == 1).all()
    centred = x - x.mean(axis=0)
    scaled = centred / np.sqrt(np.mean(centred.var(axis=0)))  # the default global scaling
    for c, score in zip(grid, probe.report.mean_scores):
        correct = []
        for split in fold_of:
            for f in range(split.max() + 1):
                held = split == f
                ref = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(
                    scaled[~held], y[~held])
                correct.extend(ref.predict(scaled[held]) == y[held])
        assert score == pytest.approx(np.mean(correct), abs=1e-12)
    assert probe.report.C == grid[int(np.argmax(probe.report.mean_scores))] or (
        probe.report.mean_scores[0] == probe.report.mean_scores[1])


def test_the_cheaper_cross_validation_picks_what_the_full_tight_one_picks(monkeypatch):
    """Looser CV fits and the accuracy walk that stops early choose the same C, and the
    final fit (at the full tolerance) is the same solution."""
    x, y = blobs(300, 40, 4, spread=0.25)
    monkeypatch.setattr(probe_solver, "ACCURACY_STOP_MIN_ROWS", 300)  # 300 held out here
    fast = fit_linear_probe(x, y, "classification", 4)
    monkeypatch.setattr(probe_solver, "_CV_TOL_FACTOR", 1.0)
    monkeypatch.setattr(probe_solver, "ACCURACY_STOP_MIN_ROWS", 10**9)
    full = fit_linear_probe(x, y, "classification", 4)
    assert len(full.report.grid) == len(probe_module.DEFAULT_GRID)
    assert len(fast.report.grid) < len(full.report.grid)  # it stopped on the weak side
    assert fast.report.C == full.report.C
    # At most one held-out row of 300 on the border between two classes flips.
    np.testing.assert_allclose(fast.report.mean_scores, full.report.mean_scores[
        :len(fast.report.mean_scores)], atol=1.01 / 300)
    np.testing.assert_allclose(fast.predict(x), full.predict(x), atol=1e-4)


def test_the_path_predictor_steps_on_along_the_line_of_the_last_two_solutions():
    before = probe_solver._Solution(np.array([[1.0, 2.0]]), np.array([0.5, -np.inf]))
    current = probe_solver._Solution(np.array([[2.0, 2.0]]), np.array([1.0, -np.inf]))
    # log C steps of 2 then 1: half the last step again.
    start = probe_solver._extrapolated(current, before, 0.5)
    np.testing.assert_array_equal(start.coef, [[2.5, 2.0]])
    np.testing.assert_array_equal(start.intercept, [1.25, -np.inf])  # absent stays absent
    assert probe_solver._extrapolated(current, None, 1.0) is current
    assert probe_solver._extrapolated(None, None, 1.0) is None


def test_the_path_predictor_saves_iterations_and_changes_no_choice(monkeypatch):
    """Cross-validation warm-started on the line through the last two solutions takes
    fewer L-BFGS iterations than from the last solution alone, for the same C, and its
    held-out scores are those of fits 100 times tighter but for a row of 300."""
    x, y = blobs(300, 100, 10, spread=0.3)
    line = fit_linear_probe(x, y, "classification", 10)
    monkeypatch.setattr(probe_solver, "_CV_TOL_FACTOR", 1.0)
    tight = fit_linear_probe(x, y, "classification", 10)
    monkeypatch.undo()
    monkeypatch.setattr(probe_solver, "_extrapolated", lambda current, before, ratio: current)
    last = fit_linear_probe(x, y, "classification", 10)
    assert line.report.grid == last.report.grid and line.report.C == last.report.C
    assert tight.report.C == line.report.C
    np.testing.assert_allclose(line.report.mean_scores, tight.report.mean_scores, atol=1.01 / 300)
    cv_iterations = [p.report.iterations - p.report.final_iterations for p in (line, last)]
    assert cv_iterations[0] < 0.75 * cv_iterations[1], cv_iterations  # 81 against 153
    np.testing.assert_allclose(line.predict(x), last.predict(x), atol=1e-4)


def test_accuracy_ties_are_broken_by_the_held_out_log_loss():
    x, y = blobs(80, 4, 2, spread=10.0)  # separable: accuracy 1 over most of the grid
    probe = fit_linear_probe(x, y, "classification", 2, scoring="accuracy")
    scores = np.array(probe.report.mean_scores)
    ties = [c for c, s in zip(probe.report.grid, scores) if s == scores.max()]
    assert len(ties) > 1 and probe.report.C in ties
    losses = fit_linear_probe(x, y, "classification", 2, scoring="log_loss",
                              grid=ties).report.mean_scores
    assert probe.report.C == ties[int(np.argmin(losses))]


def test_tiny_data_uses_leave_one_out():
    x, y = blobs(6, 5, 3, spread=3.0)  # 2 examples per class
    probe = fit_linear_probe(x, y, "classification", 3)
    assert probe.report.cv == "leave-one-out + 3 x 5-fold stratified"
    assert len(probe.report.fold_scores) == 6 + 3 * 5
    assert np.isfinite(probe.kernel).all() and np.isfinite(probe.bias).all()
    assert (probe.logits(x).argmax(axis=1) == y).all()


def test_singleton_class_and_class_without_examples():
    x, y = blobs(30, 4, 3, spread=3.0)
    y[0] = 3  # one member only: absent from the training rows of its fold
    with pytest.warns(RuntimeWarning, match=r"Outputs \[4\]"):
        probe = fit_linear_probe(x, y, "classification", 5, folds=3)
    assert np.isfinite(probe.report.mean_scores).all()
    np.testing.assert_array_equal(probe.kernel[:, 4], 0.0)
    at_mean = probe.logits(x.mean(axis=0, keepdims=True))[0]
    assert at_mean[4] == pytest.approx(at_mean[:4].min() - 10.0)
    assert probe.predict(x)[:, 4].max() < 1e-3


def test_sample_weights_weight_the_loss():
    """Integer weights are repeated rows of the loss (standardisation stays unweighted)."""
    x, y = blobs(40, 6, 2, spread=0.3)
    repeats = np.arange(40) % 3 + 1
    weighted = fit_linear_probe(x, y, "classification", 2, regularization=0.5,
                                sample_weight=repeats, tol=1e-9, scaling="per_feature")
    xs = standardized(x)
    ref = LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000).fit(
        xs, y, sample_weight=repeats)
    np.testing.assert_allclose(weighted.predict(x)[:, 1], ref.predict_proba(xs)[:, 1], atol=1e-6)
    # Up-weighting class 1 raises its probabilities everywhere.
    plain = fit_linear_probe(x, y, "classification", 2, regularization=0.5)
    heavy = fit_linear_probe(x, y, "classification", 2, regularization=0.5,
                             sample_weight=np.where(y == 1, 5.0, 1.0))
    assert (heavy.predict(x)[:, 1] > plain.predict(x)[:, 1]).all()
    # A zero weight is the same as leaving the row out.
    zero = np.ones(40)
    zero[:5] = 0.0
    dropped = fit_linear_probe(x, y, "classification", 2, regularization=0.5, sample_weight=zero,
                               scaling="per_feature")
    kept = LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000).fit(xs[5:], y[5:])
    np.testing.assert_allclose(dropped.predict(x)[:, 1], kept.predict_proba(xs)[:, 1], atol=1e-5)


# --- Calibration --------------------------------------------------------------------------


def training_log_loss(probe, x, y, kind):
    if kind == "classification":
        p = probe.predict(x)[np.arange(len(y)), y]
        return float(-np.mean(np.log(p)))
    p = probe.predict(x)
    return float(-np.mean(np.where(y > 0, np.log(p), np.log1p(-p))))


@pytest.mark.parametrize("kind", ["classification", "multilabel"])
def test_calibration_brings_the_training_loss_to_the_held_out_loss(kind):
    """More features than rows: solved as is, the probe is over-confident on its rows."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(80, 300))
    signal = x[:, :3] + 0.8 * rng.normal(size=(80, 3))
    y = signal.argmax(axis=1) if kind == "classification" else (signal > 0).astype(int)
    # One split: C lands at the weak end here, where the probe is over-confident
    # (with the repeated splits of the default, at the strong end).
    solved = fit_linear_probe(x, y, kind, 3, seed=2, calibrate=False, repeats=0)
    calibrated = fit_linear_probe(x, y, kind, 3, seed=2, repeats=0)
    report = calibrated.report
    assert solved.report.C == report.C and solved.report.logit_scale == 1.0
    # Over-confident as solved; the held-out loss is what cross-validation measured.
    assert training_log_loss(solved, x, y, kind) < 0.5 * report.held_out_log_loss
    same_folds = fit_linear_probe(x, y, kind, 3, seed=2, scoring="log_loss", grid=[report.C],
                                  repeats=0)
    assert report.held_out_log_loss == pytest.approx(same_folds.report.mean_scores[0], rel=1e-3)
    # One factor on every logit, chosen so that the training loss is the held-out one.
    assert 0 < report.logit_scale < 1
    np.testing.assert_allclose(calibrated.logits(x), report.logit_scale * solved.logits(x),
                               rtol=1e-6, atol=1e-9)
    assert training_log_loss(calibrated, x, y, kind) == pytest.approx(
        report.held_out_log_loss, rel=1e-4)
    assert report.training_log_loss == pytest.approx(report.held_out_log_loss, rel=1e-4)
    assert "held-out" in report.summary() and f"{report.logit_scale:.3g}" in report.summary()
    # No prediction changes, only their confidence.
    if kind == "classification":
        np.testing.assert_array_equal(calibrated.predict(x).argmax(1), solved.predict(x).argmax(1))
    else:
        np.testing.assert_array_equal(calibrated.logits(x) > 0, solved.logits(x) > 0)


def test_no_calibration_without_cross_validation_or_for_regression():
    x, y = blobs(60, 80, 3, spread=0.5)
    fixed = fit_linear_probe(x, y, "classification", 3, regularization=1.0)
    assert fixed.report.logit_scale == 1.0 and np.isnan(fixed.report.held_out_log_loss)
    assert fixed.report.training_log_loss == pytest.approx(
        training_log_loss(fixed, x, y, "classification"), rel=1e-6)
    ridge = fit_linear_probe(x, y.astype(float), "regression")
    assert ridge.report.logit_scale == 1.0 and np.isnan(ridge.report.training_log_loss)


def test_a_probe_that_is_not_over_confident_is_left_as_solved():
    solution = probe_solver._Solution(np.array([[0.1, -0.1]]), np.zeros(2))
    z = np.array([[1.0], [-1.0], [1.0], [-1.0]])
    problem = probe_solver._Problem("classification", z, np.array([0, 1, 1, 0]), 2,
                                    np.ones(4), 100, 1e-6)
    # Training loss (about 0.69) already above the target: nothing to take off.
    assert probe_solver._logit_scale(problem, solution, 0.3) == 1.0
    # Fits its rows: over-confident against a target of 0.3...
    separable = probe_solver._Problem("classification", z, np.array([0, 1, 0, 1]), 2,
                                      np.ones(4), 100, 1e-6)
    confident = probe_solver._Solution(np.array([[5.0, -5.0]]), np.zeros(2))
    assert 0 < probe_solver._logit_scale(separable, confident, 0.3) < 1
    # ...but a target no better than all-zero logits (log 2) would erase the head: kept.
    assert probe_solver._logit_scale(separable, confident, 0.8) == 1.0
    assert probe_solver._logit_scale(separable, confident, float("nan")) == 1.0


# --- The report ----------------------------------------------------------------------------


def test_report_summary_and_dict():
    x, y = blobs(100, 8, 3, spread=0.5)
    probe = fit_linear_probe(x, y, "classification", 3)
    report = probe.report
    line = report.summary()
    assert "\n" not in line and f"C={report.C:.4g}" in line and "5-fold stratified" in line
    assert report.iterations >= report.final_iterations > 0
    assert report.seconds > 0 and report.num_examples == 100 and report.num_outputs == 3
    json.dumps(report.as_dict())
    fixed = fit_linear_probe(x, y, "classification", 3, regularization=2.0)
    assert fixed.report.cv == "none" and fixed.report.grid == (2.0,)
    assert "no cross-validation" in fixed.report.summary()


# --- Bad inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("features, targets, kwargs, message", [
    ([[0.0, np.nan], [1.0, 2.0], [3.0, 4.0]], [0, 1, 0], {}, r"NaN or infinite.*rows \[0\]"),
    ([[0.0], [1.0], [2.0]], [0, 1, 7], {"num_classes": 3}, r"\[0, 3\).*received labels \[7\]"),
    ([[0.0], [1.0], [2.0]], [0, -1, 1], {}, r"received labels \[-1\]"),
    ([[0.0], [1.0], [2.0]], [0, 1], {}, r"3 rows but targets has shape \(2,\)"),
    ([[0.0, 1.0]], [0], {}, r"at least 2 examples; received features of shape \(1, 2\)"),
    ([0.0, 1.0, 2.0], [0, 1, 0], {}, r"shape \(N, D\).*received shape \(3,\)"),
    ([[0.0], [1.0], [2.0]], [0, 0.5, 1], {}, r"integers; received \[0.5\]"),
    ([[0.0], [1.0], [2.0]], [0, 1, 0], {"sample_weight": [1, -1, 1]}, r"non-negative.*min -1"),
    ([[0.0], [1.0], [2.0]], [0, 1, 0], {"sample_weight": [1, 1]}, r"sample_weight has shape"),
    ([[0.0], [1.0], [2.0]], [[0, 1], [2, 1], [0, 0]], {"kind": "multilabel"},
     r"0 or 1; received values such as \[2\]"),
    ([[0.0], [1.0], [2.0]], [1.0, np.inf, 0.0], {"kind": "regression"}, r"targets contain NaN"),
])
def test_bad_inputs_raise_data_errors_that_name_what_was_received(features, targets, kwargs,
                                                                  message):
    kind = kwargs.pop("kind", "classification")
    with pytest.raises(DataError, match=message):
        fit_linear_probe(np.asarray(features), np.asarray(targets), kind, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "softmax"}, r"kind must be one of .*received kind='softmax'"),
    ({"regularization": -1.0}, r"received -1.0"),
    ({"regularization": "strong"}, r"received 'strong'"),
    ({"folds": 1}, r"folds=1"),
    ({"repeats": -1}, r"received repeats=-1"),
    ({"repeats": "many"}, r"received repeats='many'"),
    ({"scoring": "mse"}, r"received scoring='mse'"),
    ({"scaling": "minmax"}, r"received scaling='minmax'"),
    ({"grid": [1.0, -2.0]}, r"grid must hold positive"),
])
def test_bad_arguments_raise_value_errors(kwargs, message):
    x, y = blobs(20, 3, 2)
    kind = kwargs.pop("kind", "classification")
    with pytest.raises(ValueError, match=message):
        fit_linear_probe(x, y, kind, **kwargs)


# --- Real data -----------------------------------------------------------------------------


def test_digits_accuracy_matches_sklearn_cross_validated_logistic_regression():
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = order[:300], order[300:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = fit_linear_probe(x[train], y[train], "classification", 10)
        scaler = StandardScaler().fit(x[train])
        ref = LogisticRegressionCV(Cs=10, cv=5, max_iter=5000).fit(scaler.transform(x[train]),
                                                                  y[train])
    ours = (probe.logits(x[test]).argmax(axis=1) == y[test]).mean()
    theirs = ref.score(scaler.transform(x[test]), y[test])
    assert ours >= theirs - 0.01, (ours, theirs, probe.report.summary())
    assert isinstance(probe, LinearProbe) and probe.report.converged


def test_small_products_run_on_one_blas_thread():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with probe_module._blas_threads(10_000):
        blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        assert blas and all(p["num_threads"] == 1 for p in blas)
    before = [p["num_threads"] for p in threadpoolctl.threadpool_info()]
    with probe_module._blas_threads(10**12):  # large products keep every thread
        assert [p["num_threads"] for p in threadpoolctl.threadpool_info()] == before
