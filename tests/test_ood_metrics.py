"""Tests for hvaeood.ood_metrics (OOD = positive class, higher score = more OOD)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from hvaeood import ood_metrics as om

sk_metrics = pytest.importorskip("sklearn.metrics")

MODULE_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "hvaeood", "ood_metrics.py")


# --------------------------------------------------------------------------- #
# hand-made cases with known answers
# --------------------------------------------------------------------------- #
def test_worked_example_by_hand():
    # labels [0,0,1,1], scores [0.1,0.4,0.35,0.8]
    # sorted desc: 0.8(+) 0.4(-) 0.35(+) 0.1(-)
    # AUROC: pos/neg pairs (0.8>0.1, 0.8>0.4, 0.35>0.1, 0.35<0.4) -> 3/4
    # PR steps: t=0.8: P=1,   R=.5 ; t=0.4: P=1/2, R=.5 ; t=0.35: P=2/3, R=1
    #   AP = 0.5*1 + 0*0.5 + 0.5*(2/3) = 5/6
    # ROC: (0,0) (0,.5) (.5,.5) (.5,1) (1,1) -> first TPR>=0.8 at FPR 0.5
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    assert om.auroc(y, s) == pytest.approx(0.75, abs=1e-12)
    assert om.auprc(y, s) == pytest.approx(5.0 / 6.0, abs=1e-12)
    assert om.fpr_at_tpr(y, s) == pytest.approx(0.5, abs=1e-12)
    fpr, tpr, thr = om.roc_curve(y, s)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])


def test_worked_example_with_cross_class_tie():
    # neg {1, 0}, pos {1, 2}: pairs (1v1 tie=.5, 1>0, 2>1, 2>0) -> 3.5/4
    # groups desc: {2:+} P=1 R=.5 ; {1:+,-} P=2/3 R=1 ; {0:-}
    #   AP = .5*1 + .5*(2/3) = 5/6 ; ROC (0,0) (0,.5) (.5,1) (1,1)
    y = [0, 1, 0, 1]
    s = [1.0, 1.0, 0.0, 2.0]
    assert om.auroc(y, s) == pytest.approx(0.875, abs=1e-12)
    assert om.auprc(y, s) == pytest.approx(5.0 / 6.0, abs=1e-12)
    fpr, tpr, thr = om.roc_curve(y, s)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 2.0, 1.0, 0.0])
    assert om.fpr_at_tpr(y, s) == pytest.approx(0.5)


def test_perfect_separation():
    y = np.r_[np.zeros(50), np.ones(30)].astype(int)
    s = np.r_[np.linspace(-3, -1, 50), np.linspace(1, 3, 30)]
    assert om.auroc(y, s) == 1.0
    assert om.auprc(y, s) == 1.0
    assert om.fpr_at_tpr(y, s) == 0.0


def test_reversed_separation():
    y = np.r_[np.zeros(50), np.ones(30)].astype(int)
    s = np.r_[np.linspace(1, 3, 50), np.linspace(-3, -1, 30)]
    assert om.auroc(y, s) == 0.0
    # every in-distribution example must be flagged before any OOD one
    assert om.fpr_at_tpr(y, s) == 1.0
    assert om.auprc(y, s) < 30 / 80  # worse than chance


def test_all_ties():
    y = np.r_[np.zeros(40), np.ones(10)].astype(int)
    s = np.full(50, 3.0)
    assert om.auroc(y, s) == 0.5
    assert om.auprc(y, s) == pytest.approx(10 / 50)  # prevalence
    assert om.fpr_at_tpr(y, s) == 1.0
    fpr, tpr, thr = om.roc_curve(y, s)
    np.testing.assert_array_equal(fpr, [0, 1])
    np.testing.assert_array_equal(tpr, [0, 1])


def test_metrics_are_not_negation_symmetric():
    y = [0, 0, 1, 1]
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert om.auroc(y, -s) == pytest.approx(1 - om.auroc(y, s))
    assert om.auprc(y, -s) != pytest.approx(om.auprc(y, s))


def test_fpr_at_tpr_exact_level_and_custom_level():
    # 5 positives: TPR hits exactly 4/5 = 0.8 after the 4th positive.
    y = [1, 1, 1, 1, 0, 1, 0, 0, 0, 0]
    s = np.arange(10, 0, -1, dtype=float)
    assert om.fpr_at_tpr(y, s, 0.8) == 0.0
    assert om.fpr_at_tpr(y, s, 0.81) == pytest.approx(0.2)
    assert om.fpr_at_tpr(y, s, 1.0) == pytest.approx(0.2)
    assert om.fpr_at_tpr(y, s, 0.0) == 0.0
    with pytest.raises(ValueError):
        om.fpr_at_tpr(y, s, 1.5)


def test_bool_labels_and_int_scores():
    y = np.array([False, False, True, True])
    s = np.array([1, 4, 3, 8])
    assert om.auroc(y, s) == pytest.approx(0.75)


@pytest.mark.parametrize(
    "labels, scores, match",
    [
        ([0, 1, 1], [0.1, np.nan, 0.3], "non-finite"),
        ([0, 1, 1], [0.1, np.inf, 0.3], "non-finite"),
        ([0, 1], [0.1, 0.2, 0.3], "length"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "binary"),
        ([1, 1, 1], [0.1, 0.2, 0.3], "both classes"),
        ([0, 0], [0.1, 0.2], "both classes"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_metric_input_validation(labels, scores, match):
    for fn in (om.auroc, om.auprc, om.fpr_at_tpr, om.roc_curve):
        with pytest.raises(ValueError, match=match):
            fn(labels, scores)


# --------------------------------------------------------------------------- #
# agreement with scikit-learn on random inputs with ties
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", range(8))
def test_against_sklearn_random_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_neg, n_pos = rng.integers(5, 400, size=2)
    neg = rng.normal(0.0, 1.0, n_neg)
    pos = rng.normal(rng.uniform(-1, 2), rng.uniform(0.5, 2), n_pos)
    # coarse rounding -> many ties within and across classes
    decimals = int(rng.integers(0, 2))
    s = np.round(np.r_[neg, pos], decimals)
    y = np.r_[np.zeros(n_neg, int), np.ones(n_pos, int)]
    perm = rng.permutation(y.size)
    y, s = y[perm], s[perm]
    assert len(np.unique(s)) < s.size  # the test really has ties

    assert om.auroc(y, s) == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-12)
    assert om.auprc(y, s) == pytest.approx(
        sk_metrics.average_precision_score(y, s), abs=1e-12
    )
    fpr, tpr, thr = om.roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = sk_metrics.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert np.isinf(thr[0]) and np.all(np.diff(thr) < 0)

    r_fpr, r_tpr, r_thr = sk_metrics.roc_curve(y, s)  # default: drop_intermediate
    d_fpr, d_tpr, d_thr = om.roc_curve(y, s, drop_intermediate=True)
    np.testing.assert_allclose(d_fpr, r_fpr, atol=1e-12)
    np.testing.assert_allclose(d_tpr, r_tpr, atol=1e-12)
    np.testing.assert_array_equal(d_thr[1:], r_thr[1:])

    for level in (0.8, 0.95, 0.5):
        # the reference's FPR80 recipe, on sklearn's default (dropped) curve
        ref = r_fpr[np.argmax(r_tpr >= level)]
        got = om.fpr_at_tpr(y, s, level, drop_intermediate=True)
        assert got == pytest.approx(ref, abs=1e-12)
        # default: the lowest FPR over all thresholds that reach the level
        exact = min(
            np.mean(s[y == 0] >= t) for t in np.unique(s) if np.mean(s[y == 1] >= t) >= level
        )
        assert om.fpr_at_tpr(y, s, level) == pytest.approx(exact, abs=1e-12)
        assert om.fpr_at_tpr(y, s, level) <= got + 1e-12


def test_fpr_at_tpr_drop_intermediate_differs_on_tied_diagonal():
    # groups (desc): {5: +}, {4: +,-}, {3: +,-}, {2: +,-}, {1: -,-}
    # ROC points: (0,0) (0,.25) (.2,.5) (.4,.75) (.6,1) (1,1)
    # (.2,.5) (.4,.75) (.6,1) are equally spaced on a line, so sklearn's
    # default curve drops (.4,.75); FPR at TPR>=0.7 then jumps from .4 to .6.
    y = [1, 1, 0, 1, 0, 1, 0, 0, 0]
    s = [5, 4, 4, 3, 3, 2, 2, 1, 1]
    assert om.fpr_at_tpr(y, s, 0.7) == pytest.approx(0.4)
    assert om.fpr_at_tpr(y, s, 0.7, drop_intermediate=True) == pytest.approx(0.6)
    r_fpr, r_tpr, _ = sk_metrics.roc_curve(y, s)
    assert r_fpr[np.argmax(r_tpr >= 0.7)] == pytest.approx(0.6)
    fpr, tpr, _ = om.roc_curve(y, s, drop_intermediate=True)
    np.testing.assert_allclose(fpr, r_fpr)


@pytest.mark.parametrize("seed", range(3))
def test_against_sklearn_continuous(seed):
    rng = np.random.default_rng(100 + seed)
    y = rng.integers(0, 2, 1000)
    y[:2] = [0, 1]
    s = rng.normal(size=1000) + 0.7 * y
    assert om.auroc(y, s) == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-12)
    assert om.auprc(y, s) == pytest.approx(
        sk_metrics.average_precision_score(y, s), abs=1e-12
    )


# --------------------------------------------------------------------------- #
# subsampling
# --------------------------------------------------------------------------- #
def test_subsample_equal_counts_and_smaller_set_whole():
    idx_in, idx_ood = om.subsample_to_equal(1000, 300, seed=0)
    assert idx_in.shape == idx_ood.shape == (300,)
    np.testing.assert_array_equal(idx_ood, np.arange(300))
    assert len(np.unique(idx_in)) == 300  # without replacement
    assert idx_in.min() >= 0 and idx_in.max() < 1000
    assert np.all(np.diff(idx_in) > 0)

    idx_in, idx_ood = om.subsample_to_equal(200, 700, seed=0)
    np.testing.assert_array_equal(idx_in, np.arange(200))
    assert len(np.unique(idx_ood)) == 200 and idx_ood.max() < 700

    idx_in, idx_ood = om.subsample_to_equal(50, 50, seed=3)
    np.testing.assert_array_equal(idx_in, np.arange(50))
    np.testing.assert_array_equal(idx_ood, np.arange(50))


def test_subsample_seeded_deterministic_and_seed_dependent():
    a = om.subsample_to_equal(1000, 300, seed=7)
    b = om.subsample_to_equal(1000, 300, seed=7)
    c = om.subsample_to_equal(1000, 300, seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_subsample_rejects_empty():
    with pytest.raises(ValueError):
        om.subsample_to_equal(0, 10, seed=0)


# --------------------------------------------------------------------------- #
# ood_table
# --------------------------------------------------------------------------- #
def _toy_scores(seed=0, n_in=500, n_a=200, n_b=800):
    rng = np.random.default_rng(seed)
    llr_in = rng.normal(0, 1, n_in)
    lk_in = rng.normal(-100, 5, n_in)
    in_scores = {"LLR>2": llr_in, "-L>2": -lk_in}
    ood = {
        "MNIST": {"LLR>2": rng.normal(1.5, 1, n_a), "-L>2": -rng.normal(-110, 5, n_a)},
        "KMNIST": {"LLR>2": rng.normal(0.3, 1, n_b), "-L>2": -rng.normal(-95, 5, n_b)},
    }
    return in_scores, ood


def test_ood_table_structure_and_values():
    in_scores, ood = _toy_scores()
    table = om.ood_table(in_scores, ood, seed=0)
    assert list(table) == ["MNIST", "KMNIST"]
    for name in table:
        assert list(table[name]) == ["LLR>2", "-L>2"]
        for entry in table[name].values():
            assert set(entry) == {"auroc", "auprc", "fpr80", "n"}
            for k in ("auroc", "auprc", "fpr80"):
                assert 0.0 <= entry[k] <= 1.0
    assert table["MNIST"]["LLR>2"]["n"] == 200
    assert table["KMNIST"]["LLR>2"]["n"] == 500

    # recompute by hand from the documented subsampling
    for name, n_ood in (("MNIST", 200), ("KMNIST", 800)):
        idx_in, idx_ood = om.subsample_to_equal(500, n_ood, seed=0)
        for score in ("LLR>2", "-L>2"):
            s = np.r_[in_scores[score][idx_in], ood[name][score][idx_ood]]
            y = np.r_[np.zeros(len(idx_in)), np.ones(len(idx_ood))].astype(int)
            e = table[name][score]
            assert e["auroc"] == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-12)
            assert e["auprc"] == pytest.approx(
                sk_metrics.average_precision_score(y, s), abs=1e-12
            )
            fpr, tpr, _ = sk_metrics.roc_curve(y, s)
            assert e["fpr80"] == pytest.approx(fpr[np.argmax(tpr >= 0.8)], abs=1e-12)

    # the shifted OOD set is detected well by LLR, the weakly shifted one less so
    assert table["MNIST"]["LLR>2"]["auroc"] > 0.8
    assert table["MNIST"]["LLR>2"]["auroc"] > table["KMNIST"]["LLR>2"]["auroc"]


def test_ood_table_uses_caller_orientation():
    """No sign flipping or max(a, 1-a): negated inputs give mirrored AUROC."""
    in_scores, ood = _toy_scores()
    t = om.ood_table(in_scores, ood, seed=1)
    neg_in = {k: -v for k, v in in_scores.items()}
    neg_ood = {o: {k: -v for k, v in d.items()} for o, d in ood.items()}
    tn = om.ood_table(neg_in, neg_ood, seed=1)
    for o in t:
        for s in t[o]:
            assert tn[o][s]["auroc"] == pytest.approx(1 - t[o][s]["auroc"], abs=1e-12)
    # -L>2 for MNIST: OOD has *lower* L>k, so the oriented score is high
    assert t["MNIST"]["-L>2"]["auroc"] > 0.5
    assert tn["MNIST"]["-L>2"]["auroc"] < 0.5


def test_ood_table_same_indices_across_scores_and_independent_of_other_sets():
    rng = np.random.default_rng(5)
    a_in, a_ood = rng.normal(size=300), rng.normal(0.5, 1, 1000)
    # a strictly monotone transform of the same score: rank metrics must agree
    # exactly, which only holds if both scores use the same subsample.
    in_scores = {"a": a_in, "b": 3 * np.exp(a_in / 4) + 1}
    ood = {"X": {"a": a_ood, "b": 3 * np.exp(a_ood / 4) + 1}}
    t = om.ood_table(in_scores, ood, seed=11)
    for k in ("auroc", "auprc", "fpr80"):
        assert t["X"]["a"][k] == pytest.approx(t["X"]["b"][k], abs=1e-12)
    other = {"Y": {"a": rng.normal(size=50), "b": rng.normal(size=50)}}
    t2 = om.ood_table(in_scores, {**other, **ood}, seed=11)
    assert t2["X"] == t["X"]
    # different seed, different subsample of the larger OOD set
    t3 = om.ood_table(in_scores, ood, seed=12)
    assert t3["X"]["a"]["auroc"] != t["X"]["a"]["auroc"]


def test_ood_table_self_comparison_is_half():
    in_scores, _ = _toy_scores()
    t = om.ood_table(in_scores, {"self": dict(in_scores)}, seed=0)
    for entry in t["self"].values():
        assert entry["auroc"] == 0.5


def test_ood_table_nonfinite_error_names_score_and_count():
    in_scores, ood = _toy_scores()
    bad = ood["KMNIST"]["-L>2"].copy()
    bad[[3, 10, 20]] = [np.nan, np.inf, -np.inf]
    ood["KMNIST"]["-L>2"] = bad
    with pytest.raises(ValueError, match=r"-L>2.*3 non-finite"):
        om.ood_table(in_scores, ood, seed=0)

    in_scores, ood = _toy_scores()
    in_scores["LLR>2"] = in_scores["LLR>2"].copy()
    in_scores["LLR>2"][0] = np.nan
    with pytest.raises(ValueError, match=r"LLR>2.*1 non-finite"):
        om.ood_table(in_scores, ood, seed=0)


def test_ood_table_other_validation():
    in_scores, ood = _toy_scores()
    ood["MNIST"]["LLR>2"] = ood["MNIST"]["LLR>2"][:-1]
    with pytest.raises(ValueError, match="differ in length"):
        om.ood_table(in_scores, ood, seed=0)

    in_scores, ood = _toy_scores()
    in_scores["LLR>2"] = in_scores["LLR>2"].reshape(-1, 1)
    with pytest.raises(ValueError, match="1-D"):
        om.ood_table(in_scores, ood, seed=0)

    in_scores, ood = _toy_scores()
    ood["MNIST"]["unknown"] = ood["MNIST"]["LLR>2"]
    with pytest.raises(ValueError, match="unknown"):
        om.ood_table(in_scores, ood, seed=0)

    with pytest.raises(ValueError):
        om.ood_table({}, ood, seed=0)


def test_ood_roc_curves_match_table():
    in_scores, ood = _toy_scores()
    t = om.ood_table(in_scores, ood, seed=2)
    curves = om.ood_roc_curves(in_scores, ood, seed=2)
    for o in t:
        for s in t[o]:
            fpr, tpr = curves[o][s]
            area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
            assert area == pytest.approx(t[o][s]["auroc"], abs=1e-12)


# --------------------------------------------------------------------------- #
# markdown
# --------------------------------------------------------------------------- #
def test_format_markdown_table_numbers():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    table = om.ood_table({"LLR>1": s[:2], "-L>1": -s[:2]},
                         {"MNIST": {"LLR>1": s[2:], "-L>1": -s[2:]}}, seed=0)
    assert table["MNIST"]["LLR>1"]["auroc"] == pytest.approx(om.auroc(y, s))
    md = om.format_markdown_table(table)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + 2
    assert lines[0].startswith("| Score |")
    for col in ("MNIST AUROC", "MNIST AUPRC", "MNIST FPR80"):
        assert col in lines[0]
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert row == ["LLR>1", "0.750", "0.833", "0.500"]
    row = [c.strip() for c in lines[3].strip("|").split("|")]
    assert row[0] == "-L>1" and row[1] == "0.250" and row[3] == "1.000"

    md2 = om.format_markdown_table(table, score_order=["-L>1", "LLR>1", "missing"])
    rows = md2.strip().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["-L>1", "LLR>1", "missing"]
    assert rows[2].count("-") >= 3


# --------------------------------------------------------------------------- #
# import hygiene: numpy only
# --------------------------------------------------------------------------- #
def test_module_imports_no_sklearn_or_jax():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {os.path.abspath(MODULE_PATH)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "bad = [k for k in ('sklearn', 'jax', 'scipy', 'matplotlib') if k in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
