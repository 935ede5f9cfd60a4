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
pixel order too): |x - baseline| alone beats a random order on them. eMPRT asks for a rise in
complexity above every control's by the random map's spread over images. Completeness asks 95% of
images within the IG tolerance; the one-step IG control cannot reach it.

A test that no control fails tests nothing: each Test names the controls that must fail it
(`must_fail`), tests/test_trust.py checks that they do on hand-made and on measured controls, and
uninformative(table) names any test a must-fail control passed on a run, which the report prints.
The recommended method is the best of those that pass every test that applies to them: the largest
ROAD gap, then the lowest deletion AUC.
"""
from dataclasses import dataclass

import db
import formats
import quality

RANDOM, INPUT, EDGE, ONE_STEP = "control:random", "control:input", "control:edge", "control:ig_1step"
MODEL_FREE = (INPUT, EDGE)  # ignore the model and give the same map every call
THRESHOLD_CONTROLS = (RANDOM, INPUT, EDGE)  # the controls the rules below set thresholds from
COMPLETENESS_SHARE = 0.95  # complete methods: share of images within the IG tolerance


@dataclass(frozen=True)
class Test:
    name: str
    title: str
    better: str  # "lower" or "higher": which side of the threshold passes
    catches: str  # one line: what a failing method gets wrong
    criterion: str  # where the threshold comes from
    must_fail: tuple  # the controls that must fail it, or the test tests nothing
    kind: str = "measure"  # how its value reads: formats.measure, or formats.share for a share


TESTS = (
    Test("deletion", "deletion AUC", "lower", "maps whose top pixels the model does not need "
         "(Petsiuk et al. 2018)", "below a random pixel order's and every control's", THRESHOLD_CONTROLS),
    Test("insertion", "insertion AUC", "higher", "maps whose top pixels do not bring the class back",
         "above a random pixel order's and every control's", THRESHOLD_CONTROLS),
    Test("road", "ROAD LeRF − MoRF", "higher", "the same without deletion's leak: imputed pixels keep the "
         "image natural, so the drop is the pixels' (Rong et al. 2022)", "above every control's gap",
         THRESHOLD_CONTROLS),
    Test("mprt", "MPRT (bottom-up)", "lower", "maps that survive re-initialising every layer, first layer "
         "first (Adebayo et al. 2018; Binder et al. 2023)", "below the controls' midpoint", MODEL_FREE),
    Test("smooth_mprt", "sMPRT", "lower", "the same on maps smoothed over noisy inputs, so that gradient "
         "noise cannot pass for change (Hedström et al. 2023)", "below the controls' midpoint", MODEL_FREE),
    Test("efficient_mprt", "eMPRT", "higher", "maps that do not grow more complex (histogram entropy) once "
         "the model is random (Hedström et al. 2023)", "above every control's rise by the random map's spread",
         THRESHOLD_CONTROLS),
    Test("random_logit", "RandomLogit SSIM", "lower", "maps that look the same whichever class is asked "
         "for (Sixt et al. 2020)", "below the controls' midpoint", MODEL_FREE),
    Test("completeness", "completeness", "higher", "IG maps that do not add up to f(x) − f(baseline)",
         f"at least {formats.share(COMPLETENESS_SHARE)} of images within the tolerance", (ONE_STEP,), "share"),
    Test("localisation", "|map| in mask", "higher", "maps that miss where the evidence is (synthetic data, "
         "where it is known)", "above every control's share", THRESHOLD_CONTROLS, "share"),
)
BY_NAME = {t.name: t for t in TESTS}


def shown(test, v):
    """A test's value or threshold as every output shows it: by the test's kind (formats.py)."""
    return formats.share(v) if BY_NAME[test].kind == "share" else formats.measure(v)


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
    """{test: threshold} from the random orders and the controls' summaries; none where a control is
    missing (the quality pass always scores them all)."""
    controls = {c: summaries.get(c, {}) for c in THRESHOLD_CONTROLS}
    if not all(controls[c].get("images") for c in THRESHOLD_CONTROLS):
        return {}
    random, model_free = controls[RANDOM], [controls[c] for c in MODEL_FREE]

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
    if value("efficient_mprt", random) is not None:  # a rise beyond what noise alone varies by
        out["efficient_mprt"] = (max(value("efficient_mprt", c) for c in controls.values())
                                 + (random.get("efficient_mprt_sd") or 0.0))
    if value("localisation", random) is not None:
        out["localisation"] = max(value("localisation", c) for c in controls.values())
    return out


def applies(test, method):
    """Completeness is asked only of the methods whose record says they are complete for every image
    (IG, its variants, the one-step IG control; expected gradients is complete only in expectation,
    and its error is reported, not tested)."""
    return test != "completeness" or quality.record(method).complete == "exact"


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
    passing = [m for m, row in table.items() if m not in quality.CONTROLS and row
               and all(t in row for t in scored if applies(t, m)) and all(t["pass"] for t in row.values())]
    if not passing:
        return None
    return min(passing, key=lambda m: (-(value("road", summaries[m]) or 0.0), summaries[m]["deletion_auc"], m))


def failed(row):
    return [test for test, t in row.items() if not t["pass"]]


def uninformative(table):
    """{test: [controls]} for each test passed on this run by a control that must fail it: there the
    test did not tell the model's maps from a control's."""
    out = {}
    for t in TESTS:
        passed = [c for c in t.must_fail if table.get(c, {}).get(t.name, {}).get("pass")]
        if passed:
            out[t.name] = passed
    return out


def table_cells(table, rec=None):
    """The trust table as the console, the report and the card show it: (tests, rows, thresholds), a
    row per method (the recommended one first, then IG, controls last): its name, then per test the
    value with pass (✓) or fail (✗), "—" where it does not apply."""
    tests = [t for t in TESTS if any(t.name in row for row in table.values())]
    order = sorted(table, key=lambda m: (m in quality.CONTROLS, m != rec, m != "ig", m))
    rows = [[m + (" (recommended)" if m == rec else ""),
             *[f"{shown(t.name, table[m][t.name]['value'])} {'✓' if table[m][t.name]['pass'] else '✗'}"
               if t.name in table[m] else "—" for t in tests]] for m in order]
    limits = [shown(t.name, next(r[t.name]['threshold'] for r in table.values() if t.name in r)) for t in tests]
    return tests, rows, limits


def columns(header, rows):
    """Text rows in columns: the first left-aligned, the rest right-aligned, each as wide as its widest
    cell (a wide title or value never pushes the next columns out of line)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + " ".join(f"{str(c):<{w}s}" if i == 0 else f"{str(c):>{w}s}"
                            for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in [header, *rows]]


def format_table(table, rec=None):
    """The trust table as text (table_cells), in columns, the thresholds last."""
    tests, rows, limits = table_cells(table, rec)
    return "\n".join(columns(["method", *[t.title for t in tests]], rows + [["threshold", *limits]]))


def explain_failures(method, row):
    """One line per failed test of a method: what it means."""
    return [f"{method} fails {BY_NAME[t].title} ({shown(t, row[t]['value'])}; needs {BY_NAME[t].better} than "
            f"{shown(t, row[t]['threshold'])}, {BY_NAME[t].criterion}): {BY_NAME[t].catches}." for t in failed(row)]


def uninformative_lines(table):
    """A warning per test that a must-fail control passed on this run (uninformative)."""
    return [f"warning: {BY_NAME[t].title} is passed by {', '.join(controls)}, which must fail it: on this run it "
            f"does not tell a method's maps from a control's, so its verdicts say little."
            for t, controls in uninformative(table).items()]


# ----------------------------------------------------------------------------- the run's summaries

MEASURES = (("images", "images", "count"), ("complete", "completeness_share", "share"),
            ("deletion", "deletion_auc", "measure"), ("(random)", "deletion_auc_random", "measure"),
            ("insertion", "insertion_auc", "measure"), ("(random)", "insertion_auc_random", "measure"),
            ("ROAD MoRF", "road_morf", "measure"), ("LeRF", "road_lerf", "measure"),
            ("infid.", "infidelity", "measure"), ("sens.", "sensitivity_max", "measure"),
            ("in mask", "mask_mass", "share"), ("rand. top-down", "randomization_spearman", "measure"),
            ("bottom-up", "randomization_bottom_up_spearman", "measure"),
            ("1 layer min", "randomization_single_min_spearman", "measure"),
            ("SSIM", "randomization_ssim", "measure"), ("sMPRT", "smooth_mprt", "measure"),
            ("eMPRT", "efficient_mprt", "measure"), ("RandLogit", "random_logit", "measure"))


def measures_table(summaries):
    """One line per method (controls last), one column per measure; "—" where it does not apply."""
    rows = [[method, *[getattr(formats, kind)(q[key]) if q.get(key) is not None else "—"
                       for _, key, kind in MEASURES]] for method, q in summaries.items()]
    return "\n".join(columns(["method", *[head for head, _, _ in MEASURES]], rows))


def assess(conn, run_id, tolerance):
    """(summaries, trust table, recommended method) of every method and control with quality rows
    in the run; `tolerance` is the IG settings' (completeness)."""
    names = sorted(db.quality_methods(conn, run_id), key=lambda m: (m in quality.CONTROLS, m != "ig", m))
    summaries = {m: quality.quality_summary(conn, run_id, m, tolerance) for m in names}
    table = trust_table(summaries)
    return summaries, table, recommended(table, summaries)


def quality_lines(summaries, table, rec, ig_settings):
    """What the console says of explanation quality: the measures, the trust table, the recommended
    method, what each method's failures mean, step advice, and any uninformative test."""
    lines = ["", "Explanation quality: means over the quality images (deletion, ROAD MoRF: lower is better; "
             "insertion, LeRF: higher; random = a random pixel order; randomisation: similarity of the "
             "trained and randomised maps, lower is better).", measures_table(summaries)]
    if table:
        lines += ["", "The published tests (✓ pass, ✗ fail; thresholds in the last row, docs/DESIGN.md says where "
                  "each comes from):", format_table(table, rec),
                  "Recommended (passes every test that applies, largest ROAD gap): "
                  f"{rec or 'none: no method passes them all'}"]
    for method, summary in summaries.items():
        if method in quality.CONTROLS:
            continue
        lines += [f"  {line}" for line in explain_failures(method, table.get(method, {}))]
        advice = completeness_advice(method, summary, ig_settings)
        lines += [advice] if advice else []
    return lines + uninformative_lines(table)


def completeness_advice(method, summary, ig_settings):
    """For a method complete by its record but short of COMPLETENESS_SHARE: a line that says so and,
    for the stored IG, which steps to rerun with; None otherwise."""
    if (quality.record(method).complete != "exact" or quality.record(method).family == "control"
            or summary.get("completeness_share", 1) >= COMPLETENESS_SHARE):
        return None
    better = 2 * ig_settings["max_steps"]
    return (f"warning: {method}: only {formats.share(summary['completeness_share'])} of images have a completeness "
            f"error within {formats.share(ig_settings['tolerance'])}"
            + (f"; rerun with --max-steps {better} (and --n-steps {min(better, 2 * ig_settings['n_steps'])} to "
               f"start higher)." if method == "ig" else "."))
