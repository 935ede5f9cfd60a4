"""trust.py: which published tests each explanation method passes, and which method to lead with.

    table = trust.trust_table(summaries)     # {method: {test: {"value", "threshold", "pass"}}}
    trust.recommended(table, summaries)     # the method figures and the report show first

Each test is scored for every method and every control on the same images (quality.py measures
them; summaries are their means). Its criterion is the published one where the paper gives one, and
otherwise a rule set by the controls, which see the same images: a random map (model-free, changes
every call), the input-only map |x - baseline| and a Sobel edge map (both ignore the model). For the
randomisation tests a map that ignores the model stays the same (similarity 1) and a random one is
unrelated (about 0); a method passes when it lies nearer the unrelated end, below the midpoint. For
deletion, insertion and ROAD a method must beat every control (and deletion/insertion the random
pixel order too): |x - baseline| alone beats a random order on them. A test that a model-free
control passes does not test model dependence, so every test is shown failing at least one control
(tests/test_trust.py). The recommended method is the best of those that pass every test that
applies to them: the largest ROAD gap, then the lowest deletion AUC.
"""
from dataclasses import dataclass

import db
import quality
from attribution import EXACTLY_COMPLETE

CONTROLS = ("control:random", "control:input", "control:edge")
MODEL_FREE = ("control:input", "control:edge")
COMPLETENESS_SHARE = 0.95  # complete methods: share of images within the IG tolerance


@dataclass(frozen=True)
class Test:
    name: str
    title: str
    better: str  # "lower" or "higher": which side of the threshold passes
    catches: str  # one line: what a failing method gets wrong
    criterion: str  # where the threshold comes from


TESTS = (
    Test("deletion", "deletion AUC", "lower", "maps whose top pixels the model does not need "
         "(Petsiuk et al. 2018)", "below a random pixel order's and every control's"),
    Test("insertion", "insertion AUC", "higher", "maps whose top pixels do not bring the class back",
         "above a random pixel order's and every control's"),
    Test("road", "ROAD LeRF − MoRF", "higher", "the same without deletion's leak: imputed pixels keep the "
         "image natural, so the drop is the pixels' (Rong et al. 2022)", "above every control's gap"),
    Test("mprt", "MPRT (bottom-up)", "lower", "maps that survive re-initialising every layer, first layer "
         "first (Adebayo et al. 2018; Binder et al. 2023)", "below the controls' midpoint"),
    Test("smooth_mprt", "sMPRT", "lower", "the same on maps smoothed over noisy inputs, so that gradient "
         "noise cannot pass for change (Hedström et al. 2023)", "below the controls' midpoint"),
    Test("efficient_mprt", "eMPRT", "higher", "maps that do not grow more complex (histogram entropy) once "
         "the model is random (Hedström et al. 2023)", "above the model-free controls' rise (0)"),
    Test("random_logit", "RandomLogit SSIM", "lower", "maps that look the same whichever class is asked "
         "for (Sixt et al. 2020)", "below the controls' midpoint"),
    Test("completeness", "completeness", "higher", "IG maps that do not add up to f(x) − f(baseline)",
         f"at least {COMPLETENESS_SHARE:.0%} of images within the tolerance"),
    Test("localisation", "|map| in mask", "higher", "maps that miss where the evidence is (synthetic data, "
         "where it is known)", "above every control's share"),
)
BY_NAME = {t.name: t for t in TESTS}


def value(test, summary):
    """A test's value in a quality summary (quality.quality_summary), or None where it does not apply."""
    if test == "road":
        lerf, morf = summary.get("road_lerf"), summary.get("road_morf")
        return None if lerf is None or morf is None else lerf - morf
    key = {"deletion": "deletion_auc", "insertion": "insertion_auc", "mprt": "randomization_bottom_up_spearman",
           "smooth_mprt": "smooth_mprt", "efficient_mprt": "efficient_mprt", "random_logit": "random_logit",
           "completeness": "completeness_share", "localisation": "mask_mass"}[test]
    return summary.get(key)


def thresholds(summaries):
    """{test: threshold} from the random orders and the controls' summaries; None where a control is
    missing (the quality pass always scores all three)."""
    controls = {c: summaries.get(c, {}) for c in CONTROLS}
    if not all(controls[c].get("images") for c in CONTROLS):
        return {}
    random, model_free = controls["control:random"], [controls[c] for c in MODEL_FREE]

    def midpoint(test):
        return (value(test, random) + min(value(test, c) for c in model_free)) / 2
    any_row = next(iter(summaries.values()))
    # no paper gives these a threshold: a method must beat the random pixel order and every control,
    # since a model-free map that beats the random order alone (|x - baseline| does) would pass them
    out = {"deletion": min([any_row.get("deletion_auc_random")] + [value("deletion", c) for c in controls.values()]),
           "insertion": max([any_row.get("insertion_auc_random")] + [value("insertion", c) for c in controls.values()]),
           "road": max(value("road", c) for c in controls.values()), "completeness": COMPLETENESS_SHARE}
    for test in ("mprt", "smooth_mprt", "random_logit"):
        if value(test, random) is not None:
            out[test] = midpoint(test)
    if value("efficient_mprt", random) is not None:
        out["efficient_mprt"] = max(value("efficient_mprt", c) for c in model_free)
    if value("localisation", random) is not None:
        out["localisation"] = max(value("localisation", c) for c in controls.values())
    return out


def applies(test, method):
    """Completeness is asked of the methods complete for every image only (IG and its variants;
    expected gradients is complete only in expectation, and its error is reported, not tested)."""
    return test != "completeness" or method in EXACTLY_COMPLETE


def trust_table(summaries):
    """{method: {test: {"value", "threshold", "pass"}}} for every method and control with quality
    rows, over every test that applies and has a value."""
    limits = thresholds(summaries)
    table = {}
    for method, summary in summaries.items():
        if not summary.get("images"):
            continue
        row = {}
        for test, limit in limits.items():
            v = value(test, summary)
            if v is None or limit is None or not applies(test, method):
                continue
            passed = v < limit if BY_NAME[test].better == "lower" else v > limit
            if test == "completeness":
                passed = v >= limit
            row[test] = {"value": v, "threshold": limit, "pass": bool(passed)}
        table[method] = row
    return table


def recommended(table, summaries):
    """The method (not a control) that passes every test applying to it, best first by ROAD gap and
    then deletion AUC; None when none passes them all. A method missing a test the run scored (rows
    stored before that test existed) is not eligible: an unmeasured test is not a passed one."""
    scored = {t for row in table.values() for t in row}
    passing = [m for m, row in table.items() if m not in CONTROLS and row
               and all(t in row for t in scored if applies(t, m)) and all(t["pass"] for t in row.values())]
    if not passing:
        return None
    return min(passing, key=lambda m: (-(value("road", summaries[m]) or 0.0), summaries[m]["deletion_auc"], m))


def failed(row):
    return [test for test, t in row.items() if not t["pass"]]


def table_cells(table, rec=None):
    """The trust table as the console, the report and the card show it: (tests, rows, thresholds), a
    row per method (the recommended one first, then IG, controls last): its name, then per test the
    value with pass (✓) or fail (✗), "—" where it does not apply."""
    tests = [t for t in TESTS if any(t.name in row for row in table.values())]
    order = sorted(table, key=lambda m: (m in CONTROLS, m != rec, m != "ig", m))
    rows = [[m + (" (recommended)" if m == rec else ""),
             *[f"{table[m][t.name]['value']:.3f} {'✓' if table[m][t.name]['pass'] else '✗'}" if t.name in table[m]
               else "—" for t in tests]] for m in order]
    limits = [f"{next(r[t.name]['threshold'] for r in table.values() if t.name in r):.3f}" for t in tests]
    return tests, rows, limits


def format_table(table, rec=None):
    """The trust table as text (table_cells), in columns."""
    tests, rows, limits = table_cells(table, rec)
    widths = [max(len(t.title), 9) for t in tests]
    lines = ["  " + f"{'method':20s} " + " ".join(f"{t.title:>{w}s}" for t, w in zip(tests, widths, strict=True))]
    for name, *cells in rows + [["threshold", *limits]]:
        lines.append(f"  {name:20s} " + " ".join(f"{c:>{w}s}" for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def explain_failures(method, row):
    """One line per failed test of a method: what it means."""
    return [f"{method} fails {BY_NAME[t].title} ({row[t]['value']:.3f}; needs {BY_NAME[t].better} than "
            f"{row[t]['threshold']:.3f}, {BY_NAME[t].criterion}): {BY_NAME[t].catches}." for t in failed(row)]


# ----------------------------------------------------------------------------- the run's report

MEASURES = (("images", "images", "{:d}"), ("complete", "completeness_share", "{:.0%}"),
            ("deletion", "deletion_auc", "{:.3f}"), ("(random)", "deletion_auc_random", "{:.3f}"),
            ("insertion", "insertion_auc", "{:.3f}"), ("(random)", "insertion_auc_random", "{:.3f}"),
            ("ROAD MoRF", "road_morf", "{:.3f}"), ("LeRF", "road_lerf", "{:.3f}"),
            ("infid.", "infidelity", "{:.3g}"), ("sens.", "sensitivity_max", "{:.3g}"),
            ("in mask", "mask_mass", "{:.0%}"), ("rand. top-down", "randomization_spearman", "{:.2f}"),
            ("bottom-up", "randomization_bottom_up_spearman", "{:.2f}"),
            ("1 layer min", "randomization_single_min_spearman", "{:.2f}"), ("SSIM", "randomization_ssim", "{:.2f}"),
            ("sMPRT", "smooth_mprt", "{:.2f}"), ("eMPRT", "efficient_mprt", "{:.3f}"),
            ("RandLogit", "random_logit", "{:.2f}"))


def measures_table(summaries):
    """One line per method (controls last), one column per measure; "—" where it does not apply."""
    widths = [max(len(head), 8) for head, _, _ in MEASURES]
    columns = list(zip(MEASURES, widths, strict=True))
    lines = [f"  {'method':18s} " + " ".join(f"{head:>{w}s}" for (head, _, _), w in columns)]
    for method, q in summaries.items():
        cells = [f"{'—' if q.get(key) is None else fmt.format(q[key]):>{w}s}" for (_, key, fmt), w in columns]
        lines.append(f"  {method:18s} " + " ".join(cells))
    return "\n".join(lines)


def report(conn, run_id, settings):
    """Summaries of every method and control stored for the run, its trust table and the method to
    lead with, printed with what each failure means; returns (summaries, table, recommended)."""
    names = sorted(db.quality_methods(conn, run_id), key=lambda m: (m in CONTROLS, m != "ig", m))
    summaries = {m: quality.quality_summary(conn, run_id, m, settings) for m in names}
    table = trust_table(summaries)
    rec = recommended(table, summaries)
    print("\nExplanation quality: means over the quality images (deletion, ROAD MoRF: lower is better; "
          "insertion, LeRF: higher; random = a random pixel order; randomisation: similarity of the "
          "trained and randomised maps, lower is better).")
    print(measures_table(summaries))
    if table:
        print("\nThe published tests (✓ pass, ✗ fail; thresholds in the last row, docs/DESIGN.md says where "
              "each comes from):")
        print(format_table(table, rec))
        print("Recommended (passes every test that applies, largest ROAD gap): "
              f"{rec or 'none: no method passes them all'}")
    for method, summary in summaries.items():
        if method in CONTROLS:
            continue
        for line in explain_failures(method, table.get(method, {})):
            print(f"  {line}")
        advice = completeness_advice(method, summary, settings)
        if advice:
            print(advice)
    return summaries, table, rec


def completeness_advice(method, summary, settings):
    """For an IG-type method short of COMPLETENESS_SHARE: a line that says so and, for the stored IG,
    which steps to rerun with; None otherwise."""
    if method not in EXACTLY_COMPLETE or summary.get("completeness_share", 1) >= COMPLETENESS_SHARE:
        return None
    better = 2 * settings["max_steps"]
    return (f"warning: {method}: only {summary['completeness_share']:.0%} of images have a completeness error "
            f"within {settings['tolerance']:.0%}" + (f"; rerun with --max-steps {better} (and --n-steps "
                                                     f"{min(better, 2 * settings['n_steps'])} to start higher)."
                                                     if method == "ig" else "."))
