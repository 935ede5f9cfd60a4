"""schema.py: the explanation store's tables (version 9) and the migrations from older files.

db.connect migrates an older file in place, each step in one transaction, keeping every row; each
step is in MIGRATIONS with a comment on what it changes. SCHEMA_V1 and the migrations are the record
of how older files were written: they stay as they are, and a new version adds a step.

runs: one row per (checkpoint, IG settings); rerunning evaluate.py with both unchanged reuses it.
    run_id             INTEGER PRIMARY KEY
    checkpoint_sha256  TEXT     SHA-256 of the checkpoint file
    checkpoint_path    TEXT     where it was when the run was made
    model_config       TEXT     JSON: the model config stored in the checkpoint
    class_names        TEXT     JSON list: the class names, by label
    dataset            TEXT     e.g. 'pathmnist' or 'pathmnist-synthetic'
    flag               TEXT     (v4) the MedMNIST flag, e.g. 'pathmnist', 'chestmnist'
    task               TEXT     (v4) medmnist's task string, e.g. 'multi-class', 'multi-label, binary-class'
    data_verified      INTEGER  (v4) 0 when the data file's MD5 differed from medmnist.INFO's (--trust-file)
    size               INTEGER  image side in pixels
    data_file, data_md5 TEXT    the npz file name and its MD5
    synthetic          INTEGER  1 for the synthetic dataset
    ig_settings        TEXT     JSON: n_steps, max_steps, tolerance, rule, baseline, attribute, target, attr_dtype (v6)
    metrics            TEXT     JSON: the latest test metrics for this checkpoint (NULL before)
    created_at, updated_at TEXT UTC, ISO 8601

explanations: one row per explained image and method, keyed by (run_id, split, image_index, method).
    image_index        INTEGER  index into that split of the dataset npz
    method             TEXT     (v5) 'ig' (refined, completeness-checked IG) or another attribution
                                method: ig_local, saliency, smoothgrad_sq, gradcam, occlusion
    true_label, pred_label, target INTEGER  (target: the class that was explained; true_label is -1
                                for multi-label data, whose labels are in true_labels)
    true_labels        BLOB     (v4) multi-label data only: uint8 0/1 per label; NULL otherwise
    correct            INTEGER  (v4) 1 when the prediction is right: pred_label = true_label; for
                                multi-label data, pred_label is a true label (when its probability is
                                at least 0.5) or, when no label reaches 0.5, the image has none
    confidence         REAL     probability of pred_label (softmax; a sigmoid per label for multi-label)
    probs              BLOB     float32 little-endian, one per class
    attribution        BLOB     raw little-endian array of attr_dtype, C order, shape attr_shape
    attr_dtype         TEXT     'float16' or 'float32'
    attr_shape         TEXT     e.g. '3,28,28' (channels, height, width)
    delta              REAL     Captum's convergence delta: sum(attribution) - (score - baseline_score)
    score, baseline_score REAL  the explained output at the image and at the IG baseline
    n_steps            INTEGER  integration steps used for this image
                                (delta, baseline_score and n_steps are NULL for methods other than ig)
    split              TEXT     'train', 'val', 'test', or 'slide:<slide MD5>:<tile side in level-0 px>' for
                                a whole slide's tiles (slide.py), whose image_index is the tile's index on
                                the slide's grid, row by row, and whose true_label is -1 (no label: correct 0)

quality (v2): explanation quality per image and method, keyed by (run_id, split, image_index, method).
    method             TEXT     'ig', or 'smoothgrad_ig:n=<samples>,sd=<stdev>'
    relative_error     REAL     |delta| / |score - baseline_score| (completeness)
    deletion_auc, insertion_auc (and *_random)  REAL  Petsiuk et al. 2018; random pixel order as reference
    deletion_curve, insertion_curve (and *_random) BLOB  float32 probabilities at 0, 1/28, ..., 1 of the pixels
    infidelity, sensitivity_max REAL  captum.metrics, Gaussian sd 0.05 / uniform radius 0.02 perturbations
    randomization_spearman REAL  |map| rank correlation, original vs fully randomised model (Adebayo 2018)
    randomization_spearman_signed REAL  the same without absolute values
    randomization_input_spearman  REAL  |map| rank correlation with |x - baseline| (input-only reference)
    randomization_stages TEXT  JSON object {layer: |map| correlation after re-initialising it and
                               every layer above}, in cascading order, top layer first (v2: a list);
                               layers named by model.layer_label, e.g. "conv block 5" (v8; before: "features.4")
    mask_mass, mask_area REAL   synthetic data only: share of |map| inside the evidence mask, the mask's area
    smooth_mprt        REAL     (v7) |map| Spearman, trained vs fully randomised, of maps smoothed over noisy inputs
    efficient_mprt     REAL     (v7) relative rise of the map's histogram entropy under full randomisation
    random_logit       REAL     (v7) SSIM of the map with the map of a random other class (Quantus's RandomLogit)
    road_morf, road_lerf REAL   (v7) ROAD: share of 10..90% imputation levels at which the explained class is
                                still predicted, most relevant pixels first (MoRF) and least relevant first (LeRF)
    randomization      TEXT     (v5) JSON {"top_down" | "bottom_up" | "single": {layer: {"spearman",
                                "signed", "ssim"}}}: every randomisation mode, per stage

slide_tiles (v9): where each explained slide tile lies, keyed by (run_id, split, image_index) as its
explanations are, and unique by (run_id, slide_md5, x, y, size): the slide and the tile's place on it.
    slide_md5, slide_file TEXT  the slide file's MD5 and name
    x, y, size         INTEGER  the tile's top-left corner and side, in level-0 px
    mpp                REAL     level-0 um/px used (the header's or --mpp)
    level, read_px     INTEGER  the pyramid level read and the tile's side there, before resizing
"""
import json

SCHEMA_VERSION = 9
SCHEMA_V1 = """
CREATE TABLE runs (
    run_id INTEGER PRIMARY KEY,
    checkpoint_sha256 TEXT NOT NULL,
    checkpoint_path TEXT NOT NULL,
    model_config TEXT NOT NULL,
    class_names TEXT NOT NULL,
    dataset TEXT NOT NULL,
    size INTEGER NOT NULL,
    data_file TEXT NOT NULL,
    data_md5 TEXT NOT NULL,
    synthetic INTEGER NOT NULL,
    ig_settings TEXT NOT NULL,
    metrics TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (checkpoint_sha256, ig_settings)
);
CREATE TABLE explanations (
    run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    split TEXT NOT NULL,
    image_index INTEGER NOT NULL,
    true_label INTEGER NOT NULL,
    pred_label INTEGER NOT NULL,
    target INTEGER NOT NULL,
    confidence REAL NOT NULL,
    probs BLOB NOT NULL,
    attribution BLOB NOT NULL,
    attr_dtype TEXT NOT NULL,
    attr_shape TEXT NOT NULL,
    delta REAL NOT NULL,
    score REAL NOT NULL,
    baseline_score REAL NOT NULL,
    n_steps INTEGER NOT NULL,
    PRIMARY KEY (run_id, split, image_index)
);
CREATE INDEX explanations_by_true ON explanations (run_id, split, true_label);
CREATE INDEX explanations_by_pred ON explanations (run_id, split, pred_label);
"""
QUALITY_CURVES = ("deletion_curve", "deletion_curve_random", "insertion_curve", "insertion_curve_random")
QUALITY_VALUES_V2 = ("relative_error", "deletion_auc", "deletion_auc_random", "insertion_auc",
                     "insertion_auc_random", "infidelity", "sensitivity_max", "randomization_spearman",
                     "randomization_spearman_signed", "randomization_input_spearman", "mask_mass", "mask_area")
# Version 7: sMPRT, eMPRT, RandomLogit and ROAD's MoRF/LeRF accuracy (quality.published_tests).
TRUST_VALUES = ("smooth_mprt", "efficient_mprt", "random_logit", "road_morf", "road_lerf")
QUALITY_VALUES = QUALITY_VALUES_V2 + TRUST_VALUES


def name_v2_randomization_stages(conn):
    """v2 -> v3: a v2 row's stage list becomes {layer: correlation}. The v2 code always ran the
    same six stages (classifier, then features.4 down to features.0), so the names are known."""
    rows = conn.execute("SELECT rowid, randomization_stages FROM quality").fetchall()
    for rowid, text in rows:
        values = json.loads(text)
        names = ["classifier"] + [f"features.{i}" for i in reversed(range(len(values) - 1))]
        conn.execute("UPDATE quality SET randomization_stages = ? WHERE rowid = ?",
                     (json.dumps(dict(zip(names, values, strict=True))), rowid))


RENAMED_IG_SETTINGS = {"method": "rule", "output": "attribute"}


def rename_ig_setting_keys(conn):
    """v5 -> v6: a run's IG settings say "rule" for the integration rule (was "method", which also
    names the attribution method) and "attribute" for the explained output (was "output")."""
    for run_id, text in conn.execute("SELECT run_id, ig_settings FROM runs").fetchall():
        settings = {RENAMED_IG_SETTINGS.get(k, k): v for k, v in json.loads(text).items()}
        conn.execute("UPDATE runs SET ig_settings = ? WHERE run_id = ?", (json.dumps(settings, sort_keys=True), run_id))


def label_randomization_layers(conn):
    """v7 -> v8: randomisation stages keyed by module name ("features.4") become the names
    metrics.json and the figures use ("conv block 5"): model.layer_label, which leaves a name it
    already gave unchanged."""
    from model import layer_label  # here: only an old store's migration needs it (and torch)

    def relabel(stages):
        return {layer_label(name): value for name, value in stages.items()}
    rows = conn.execute("SELECT rowid, randomization_stages, randomization FROM quality").fetchall()
    for rowid, stages, modes in rows:
        modes = json.dumps({m: relabel(s) for m, s in json.loads(modes).items()}) if modes else None
        conn.execute("UPDATE quality SET randomization_stages = ?, randomization = ? WHERE rowid = ?",
                     (json.dumps(relabel(json.loads(stages))), modes, rowid))


# MIGRATIONS[v] takes a version-v database to version v + 1: SQL, or a function of the connection.
# 1->2 adds `quality`; 2->3 names each randomisation stage beside its correlation; 3->4 serves every
# MedMNIST 2D dataset (runs.flag, task, data_verified; explanations.true_labels, correct); 4->5 keys
# explanations by method too and adds quality.randomization; 5->6 names IG's settings "rule" and
# "attribute"; 6->7 adds the published tests' columns (NULL until the next quality pass completes
# them); 7->8 labels the randomisation stages as metrics.json and the figures do ("conv block 5");
# 8->9 adds slide_tiles, so a whole slide's tiles are explained and stored (slide.py).
MIGRATIONS = {1: """
CREATE TABLE quality (
    run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    split TEXT NOT NULL,
    image_index INTEGER NOT NULL,
    method TEXT NOT NULL,
""" + "".join(f"    {c} REAL{' NOT NULL' if not c.startswith('mask') else ''},\n" for c in QUALITY_VALUES_V2)
    + "".join(f"    {c} BLOB NOT NULL,\n" for c in QUALITY_CURVES) + """\
    randomization_stages TEXT NOT NULL,
    PRIMARY KEY (run_id, split, image_index, method)
);
""", 2: name_v2_randomization_stages, 3: """
ALTER TABLE runs ADD COLUMN flag TEXT NOT NULL DEFAULT 'pathmnist';
ALTER TABLE runs ADD COLUMN task TEXT NOT NULL DEFAULT 'multi-class';
ALTER TABLE runs ADD COLUMN data_verified INTEGER NOT NULL DEFAULT 1;
ALTER TABLE explanations ADD COLUMN true_labels BLOB;
ALTER TABLE explanations ADD COLUMN correct INTEGER NOT NULL DEFAULT 0;
UPDATE explanations SET correct = (true_label = pred_label);
""", 4: """
CREATE TABLE explanations_v5 (
    run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    split TEXT NOT NULL,
    image_index INTEGER NOT NULL,
    method TEXT NOT NULL,
    true_label INTEGER NOT NULL,
    pred_label INTEGER NOT NULL,
    target INTEGER NOT NULL,
    confidence REAL NOT NULL,
    probs BLOB NOT NULL,
    attribution BLOB NOT NULL,
    attr_dtype TEXT NOT NULL,
    attr_shape TEXT NOT NULL,
    delta REAL,
    score REAL NOT NULL,
    baseline_score REAL,
    n_steps INTEGER,
    true_labels BLOB,
    correct INTEGER NOT NULL,
    PRIMARY KEY (run_id, split, image_index, method),
    CHECK (method != 'ig' OR (delta IS NOT NULL AND baseline_score IS NOT NULL AND n_steps IS NOT NULL))
);
INSERT INTO explanations_v5 SELECT run_id, split, image_index, 'ig', true_label, pred_label, target,
    confidence, probs, attribution, attr_dtype, attr_shape, delta, score, baseline_score, n_steps,
    true_labels, correct FROM explanations;
DROP TABLE explanations;
ALTER TABLE explanations_v5 RENAME TO explanations;
CREATE INDEX explanations_by_true ON explanations (run_id, split, method, true_label);
CREATE INDEX explanations_by_pred ON explanations (run_id, split, method, pred_label);
ALTER TABLE quality ADD COLUMN randomization TEXT;
""", 5: rename_ig_setting_keys,
    6: "".join(f"ALTER TABLE quality ADD COLUMN {c} REAL;\n" for c in TRUST_VALUES), 7: label_randomization_layers,
    8: """
CREATE TABLE slide_tiles (
    run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    split TEXT NOT NULL,
    image_index INTEGER NOT NULL,
    slide_md5 TEXT NOT NULL,
    slide_file TEXT NOT NULL,
    x INTEGER NOT NULL,
    y INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mpp REAL NOT NULL,
    level INTEGER NOT NULL,
    read_px INTEGER NOT NULL,
    PRIMARY KEY (run_id, split, image_index),
    UNIQUE (run_id, slide_md5, x, y, size)
);
"""}
SLIDE_TILE_COLUMNS = ("run_id", "split", "image_index", "slide_md5", "slide_file", "x", "y", "size", "mpp", "level",
                      "read_px")
EXPLANATION_REALS = ("confidence", "delta", "score", "baseline_score")
EXPLANATION_COLUMNS = ("run_id", "split", "image_index", "method", "true_label", "pred_label", "target",
                       "confidence", "probs", "attribution", "attr_dtype", "attr_shape", "delta",
                       "score", "baseline_score", "n_steps", "true_labels", "correct")
