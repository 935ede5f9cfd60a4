"""db.py: the SQLite store of attribution maps and their quality (stdlib sqlite3).

    python db.py runs/pathmnist_28/explanations.db      # runs, rows per class, accuracy, mean |delta|

The tables and their migrations are schema.py's (version in PRAGMA user_version); the store runs in
WAL mode while written and is one plain file at rest (see close), with foreign keys on. Opening an
older file migrates it in place, each step in one transaction, keeping every row.

Writes are all or nothing per batch: a row already stored is kept as it was, and a row that cannot be
stored (a missing run, a missing value) fails its whole batch with a DBError that says why.
Non-finite values (NaN, inf) are refused the same way, never stored: SQLite would turn a NaN in a
REAL column into NULL, and a NaN map or probability explains nothing. The error names the images.

This module needs only the standard library and numpy (no torch), so a store can be read anywhere.
Reading an attribution needs only sqlite3 and numpy:
    blob, dtype, shape = con.execute("SELECT attribution, attr_dtype, attr_shape FROM explanations "
                                     "WHERE run_id=? AND split=? AND image_index=?", (1, "test", 0)).fetchone()
    a = np.frombuffer(blob, dtype=np.dtype(dtype).newbyteorder("<")).reshape([int(s) for s in shape.split(",")])
"""
import argparse
import contextlib
import json
import math
import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import cli
import formats
from schema import (
    EXPLANATION_COLUMNS,
    EXPLANATION_REALS,
    MIGRATIONS,
    QUALITY_CURVES,
    QUALITY_VALUES,
    SCHEMA_V1,
    SCHEMA_VERSION,
    SLIDE_TILE_COLUMNS,
    TRUST_VALUES,
)

# Sort orders of find(): name -> (column, descending); ties always go by image index.
ORDERS = {"index": ("image_index", False), "confidence": ("confidence", False),
          "-confidence": ("confidence", True)}


class DBError(cli.UserError):
    """A path that is not our database, one of another schema version, or a write that failed."""


def table_names(conn):
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect(path, create=True):
    """Open an attribution store, checking that it is one and of this code's version.

    With create=True (evaluate.py) a missing or empty file becomes a new store and an older one is
    migrated in place. With create=False (every reader) the file is opened read-only: reading never
    creates, migrates or otherwise changes a file."""
    path = Path(path)
    if path.is_dir():
        raise DBError(f"{path} is a folder, not an SQLite database file.")
    if not create and not path.is_file():
        raise DBError(f"No database at {path}. evaluate.py writes one into the run folder "
                      f"(<run dir>/explanations.db); pass that file.")
    fix = ("give evaluate.py a new --db path to start a store there" if create
           else "pass the explanations.db that evaluate.py wrote")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
    else:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    conn.row_factory = sqlite3.Row
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = table_names(conn)
    except sqlite3.DatabaseError as e:
        conn.close()
        raise DBError(f"{path} is not an SQLite database ({e}); {fix}.") from e
    if version == 0 and not tables:
        if not create:
            conn.close()
            raise DBError(f"{path} is empty: it holds no explanation store. {fix[0].upper()}{fix[1:]}.")
        migrate(conn, 0)  # creation is the step from version 0, so two processes cannot both create
        version, tables = 1, table_names(conn)
    if not 1 <= version <= SCHEMA_VERSION or not {"runs", "explanations"} <= tables:
        conn.close()
        newer = "a newer version of this code" if version > SCHEMA_VERSION else "something else"
        raise DBError(f"{path} has schema version {version} and tables {sorted(tables)}; this code "
                      f"reads versions 1 to {SCHEMA_VERSION}. It was written by {newer}: use that, or "
                      f"{fix}.")
    if not create:
        if version < SCHEMA_VERSION:
            conn.close()
            raise DBError(f"{path} is a version-{version} store; this code reads version {SCHEMA_VERSION}. "
                          f"Reading never changes a file: run evaluate.py once with --db {path}, which "
                          f"migrates it in place and keeps every row.")
        return conn
    for v in range(version, SCHEMA_VERSION):  # each step in one transaction: all of it or none
        migrate(conn, v)
    with write_errors(conn):
        conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer; crash-safe
    conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; a power cut loses at most the last batch
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def close(conn):
    """Close a store after writing. Writing runs in WAL mode (readers never block the writer); at
    rest the store goes back to a rollback journal, so it is one self-contained file that can be
    copied as it is, and that readers open read-only without creating -wal/-shm files beside it."""
    try:
        conn.execute("PRAGMA busy_timeout = 0")  # no waiting: another open connection keeps WAL on
        conn.execute("PRAGMA journal_mode = DELETE")
    except sqlite3.OperationalError:
        pass  # another connection still has it open: it stays in WAL mode, just as safe
    conn.close()


def migrate(conn, version):
    """Take the database from `version` to `version + 1` (0: create it) in one transaction. It takes
    the write lock first and does nothing if another process took the same step meanwhile."""
    step = SCHEMA_V1 if version == 0 else MIGRATIONS[version]
    with write_errors(conn):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] == version:
                if isinstance(step, str):  # executescript would commit first: one statement at a time
                    for statement in step.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                else:
                    step(conn)
                conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.commit()
        except BaseException:
            conn.rollback()
            raise


BUSY_TIMEOUT_S = 30  # how long a write waits for another process's write to finish


def database_file(conn):
    return conn.execute("PRAGMA database_list").fetchone()[2]


@contextlib.contextmanager
def write_errors(conn, needed=None):
    """Turn SQLite's "database or disk is full" and "database is locked" into a DBError that names
    the file and says what to do; `needed` (bytes) is what the failed write was to add."""
    try:
        yield
    except sqlite3.OperationalError as e:
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        path = database_file(conn)
        if code == sqlite3.SQLITE_FULL:
            free = shutil.disk_usage(Path(path).parent).free
            need = f"; this write needed about {needed / 1e6:.2f} MB" if needed else ""
            raise DBError(f"Writing {path} failed: the disk is full, or the store reached a size limit "
                          f"({free / 1e6:.1f} MB free on its file system{need}). The write was rolled "
                          f"back whole; every batch committed before is kept. Free some space and run the "
                          f"same command again: it computes only what is missing.") from e
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise DBError(f"{path} stayed locked by another process for {BUSY_TIMEOUT_S} s, so this write "
                          f"was not made. Is another evaluate.py writing the same store? Two runs on one "
                          f"store never duplicate rows, but they wait for each other: let the other finish "
                          f"(or stop it) and run this command again; it computes only what is missing.") from e
        raise


# ----------------------------------------------------------------------------- arrays

def encode_array(a, dtype="float16"):
    """(bytes, dtype name, shape text) of a numpy array stored little-endian in C order."""
    a = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))
    return a.tobytes(), np.dtype(dtype).name, ",".join(str(s) for s in a.shape)


def decode_array(blob, dtype, shape):
    return np.frombuffer(blob, dtype=np.dtype(dtype).newbyteorder("<")).reshape(
        [int(s) for s in shape.split(",")])


# ----------------------------------------------------------------------------- writing

def run_id_for(conn, checkpoint_sha256, checkpoint_path, model_config, class_names, provenance,
               ig_settings):
    """The run for this checkpoint and these IG settings, created on first use."""
    settings = json.dumps(ig_settings, sort_keys=True)
    with write_errors(conn), conn:
        conn.execute(
            "INSERT OR IGNORE INTO runs (checkpoint_sha256, checkpoint_path, model_config, class_names, "
            "dataset, flag, task, data_verified, size, data_file, data_md5, synthetic, ig_settings, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (checkpoint_sha256, str(checkpoint_path), json.dumps(model_config, sort_keys=True),
             json.dumps(list(class_names)), provenance["dataset"], provenance["flag"],
             model_config["task"], int(provenance["verified"]),
             provenance["size"], provenance["file"], provenance["md5"],
             int(provenance["synthetic"]), settings, now(), now()))
    return conn.execute("SELECT run_id FROM runs WHERE checkpoint_sha256 = ? AND ig_settings = ?",
                        (checkpoint_sha256, settings)).fetchone()[0]


COMPLETENESS_TERMS = ("delta", "score", "baseline_score", "n_steps")  # IG's; NULL for the other methods


def explanation_rows(run_id, split, method, batch):
    """DB rows for one explained batch of N images. `batch` holds numpy arrays or lists, one entry
    per image: image_index, true_label, probs (N, K), target, attributions (N, C, H, W, already in
    the dtype to store) and, for IG, the COMPLETENESS_TERMS (a method without them stores NULL).

    The predicted class and its confidence are read from probs. true_label is (N,) class indices, or
    (N, K) of 0/1 for multi-label data (stored as true_labels, with true_label -1)."""
    image_index, true_label, target = batch["image_index"], batch["true_label"], batch["target"]
    probs = np.asarray(batch["probs"], dtype="<f4")
    attributions = np.asarray(batch["attributions"])
    n = len(probs)
    delta, score, baseline_score, n_steps = (batch.get(k, [None] * n) for k in COMPLETENESS_TERMS)
    bad = ~(np.isfinite(attributions.reshape(len(attributions), -1)).all(1) & np.isfinite(probs).all(1))
    if bad.any():
        raise DBError(f"The attribution map or class probabilities of {split} image(s) "
                      f"{np.asarray(image_index)[bad].tolist()} hold NaN or inf, so this batch was not "
                      f"stored. With --attr-dtype float16, values beyond 65504 overflow: try "
                      f"--attr-dtype float32; otherwise the model itself gives non-finite outputs.")
    true_label, pred = np.asarray(true_label), probs.argmax(1)
    correct = correct_predictions(true_label, probs)
    if true_label.ndim == 2:  # multi-label
        sets = [np.asarray(t, np.uint8).tobytes() for t in true_label]
        true_label = np.full(len(pred), -1)
    else:
        sets = [None] * len(pred)
    # Whole-column conversions: per-element indexing of arrays costs microseconds a row.
    columns = zip(np.asarray(image_index).tolist(), true_label.tolist(),
                  pred.tolist(), np.asarray(target).tolist(), probs.max(1).tolist(),
                  np.asarray(delta).tolist(), np.asarray(score).tolist(),
                  np.asarray(baseline_score).tolist(), np.asarray(n_steps).tolist(), strict=True)
    rows = []
    for i, (index, true, pred, tgt, confidence, d, f_x, f_b, steps) in enumerate(columns):
        blob, dt, shape = encode_array(attributions[i], attributions.dtype)
        rows.append({"run_id": run_id, "split": split, "image_index": index, "method": method, "true_label": true,
                     "pred_label": pred, "target": tgt, "confidence": confidence,
                     "probs": probs[i].tobytes(), "attribution": blob, "attr_dtype": dt,
                     "attr_shape": shape, "delta": d, "score": f_x, "baseline_score": f_b,
                     "n_steps": steps, "true_labels": sets[i], "correct": int(correct[i])})
    return rows


def correct_predictions(true_label, probs):
    """Which predictions are right (bool per image): the top class is the true one; for multi-label
    data (true_label (N, K) of 0/1) the top label is a finding the image has, or, when no label
    reaches 0.5, the image has none (chestmnist's many images without a finding)."""
    true_label, probs = np.asarray(true_label), np.asarray(probs)
    pred = probs.argmax(1)
    if true_label.ndim == 2:
        return np.where(probs.max(1) >= 0.5, true_label[np.arange(len(pred)), pred] == 1, true_label.sum(1) == 0)
    return true_label == pred


def done_indices(conn, run_id, split, method="ig"):
    return {r[0] for r in conn.execute(
        "SELECT image_index FROM explanations WHERE run_id = ? AND split = ? AND method = ?",
        (run_id, split, method))}


def explanation_methods(conn, run_id, split="test"):
    """The attribution methods with stored maps for this run, 'ig' first."""
    found = {r[0] for r in conn.execute("SELECT DISTINCT method FROM explanations WHERE run_id = ? AND split = ?",
                                        (run_id, split))}
    return sorted(found, key=lambda m: (m != "ig", m))


def insert_explanations(conn, rows):
    """Insert a batch of explanation dicts in one transaction; rows already stored are kept.
    Returns how many rows were added (all or nothing: see the module's docstring)."""
    refuse_non_finite(rows, "explanations", EXPLANATION_REALS)
    return insert_batch(conn, "explanations", EXPLANATION_COLUMNS,
                        [tuple(row[c] for c in EXPLANATION_COLUMNS) for row in rows])


def refuse_non_finite(rows, table, columns):
    bad = sorted({(row["image_index"], c) for row in rows for c in columns
                  if row.get(c) is not None and not math.isfinite(row[c])})
    if bad:
        raise DBError(f"{len(bad)} value(s) of this batch of {table} rows are NaN or inf (image, column: "
                      f"{bad[:5]}{' ...' if len(bad) > 5 else ''}), so none of the batch was stored. "
                      f"The model or the explanation gave non-finite numbers for these images.")


def insert_batch(conn, table, columns, values, on_conflict="DO NOTHING"):
    """INSERT the rows in one transaction, skipping keys already stored (or, with `on_conflict`,
    as it says); any other failure stores none of them and raises DBError. Returns the number of
    rows added (or changed)."""
    needed = sum(len(v) for row in values for v in row if isinstance(v, (bytes, str)))
    try:
        with write_errors(conn, needed), conn:
            cur = conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                                   f"({', '.join('?' * len(columns))}) ON CONFLICT {on_conflict}", values)
    except sqlite3.IntegrityError as e:
        raise DBError(f"A batch of {len(values)} {table} rows was not stored, none of it: {e}. "
                      f"Is the run in this database, and is every value present?") from e
    return cur.rowcount


SLIDE_SPLIT = "slide:"  # a whole slide's tiles are stored under the split "slide:<MD5>:<tile px>"


def slide_split(slide_md5, side):
    """The split name a slide's tiles are explained under: its MD5 and the tile side (level-0 px),
    so the same slide cut at another scale is other images."""
    return f"{SLIDE_SPLIT}{slide_md5}:{side}"


def insert_slide_tiles(conn, rows):
    """Record where explained slide tiles lie (dicts of SLIDE_TILE_COLUMNS), in one transaction;
    tiles already recorded are kept. Returns how many were added."""
    values = [tuple(r[c] for c in SLIDE_TILE_COLUMNS) for r in rows]
    return insert_batch(conn, "slide_tiles", SLIDE_TILE_COLUMNS, values)


def stored_images(conn, run_id, split="test"):
    """Every image index with an explanation or quality row in the run, ascending."""
    return sorted({r[0] for table in ("explanations", "quality") for r in conn.execute(
        f"SELECT DISTINCT image_index FROM {table} WHERE run_id = ? AND split = ?", (run_id, split))})


def export_rows(conn, run_id, image_indices, split="test"):
    """{table: [row dict]}: the run's explanation and quality rows of these images, every column as
    stored (no decoding), for import_rows into another store."""
    return {table: [dict(r) for r in select_in(
                conn, f"SELECT * FROM {table} WHERE run_id = ? AND split = ? AND image_index IN ({{}})",
                [run_id, split], image_indices)]
            for table in ("explanations", "quality")}


def import_rows(conn, run_id, rows):
    """Store export_rows' rows (from any store) under `run_id`, in one transaction; keys already
    stored are kept, so importing the same rows twice changes nothing. Returns rows added."""
    added = 0
    with write_errors(conn, sum(len(v) for t in rows.values() for r in t for v in r.values()
                                if isinstance(v, (bytes, str)))), conn:
        for table, table_rows in rows.items():
            if table_rows:
                columns = [c for c in table_rows[0] if c != "run_id"]
                conflict = complete_quality(columns) if table == "quality" else "DO NOTHING"
                added += conn.executemany(
                    f"INSERT INTO {table} (run_id, {', '.join(columns)}) VALUES (?{', ?' * len(columns)}) "
                    f"ON CONFLICT {conflict}", [(run_id, *(r[c] for c in columns)) for r in table_rows]).rowcount
    return added


def quality_methods(conn, run_id, split="test"):
    """The methods that have stored quality rows for this run, 'ig' first."""
    methods = {r[0] for r in conn.execute("SELECT DISTINCT method FROM quality WHERE run_id = ? AND split = ?",
                                          (run_id, split))}
    return sorted(methods, key=lambda m: (m != "ig", m))


def done_quality(conn, run_id, split, method):
    """Images with a complete quality row (rows stored before schema v7 lack the published tests)."""
    complete = " AND ".join(f"{c} IS NOT NULL" for c in TRUST_VALUES)
    return {r[0] for r in conn.execute(
        f"SELECT image_index FROM quality WHERE run_id = ? AND split = ? AND method = ? AND {complete}",
        (run_id, split, method))}


def insert_quality(conn, rows):
    """Insert a batch of quality dicts (curves as float32 arrays, stages as {layer: correlation},
    `randomization` as {mode: {layer: {measure: value}}} or absent) in one transaction."""
    columns = ("run_id", "split", "image_index", "method") + QUALITY_VALUES + QUALITY_CURVES + (
        "randomization_stages", "randomization")
    checked = [{"image_index": row["image_index"], **{c: row.get(c) for c in QUALITY_VALUES},
                **{c: float(np.sum(row[c])) for c in QUALITY_CURVES},  # NaN or inf if any point is
                "randomization_stages": float(sum(row["randomization_stages"].values())),
                "randomization": float(sum(v for mode in (row.get("randomization") or {}).values()
                                           for stage in mode.values() for v in stage.values()))}
               for row in rows]
    refuse_non_finite(checked, "quality", QUALITY_VALUES + QUALITY_CURVES + ("randomization_stages", "randomization"))
    encoded = [tuple(np.asarray(row[c], "<f4").tobytes() if c in QUALITY_CURVES
                     else json.dumps({k: round(v, 6) for k, v in row[c].items()})
                     if c == "randomization_stages"
                     else (json.dumps(row[c]) if row.get(c) is not None else None)
                     if c == "randomization" else row.get(c) for c in columns) for row in rows]
    return insert_batch(conn, "quality", columns, encoded, on_conflict=complete_quality(columns))


def complete_quality(columns):
    """The ON CONFLICT clause for quality rows: a row stored before the published tests existed
    (schema v7) is completed with the new row's values; a complete one is kept as it was."""
    incomplete = " OR ".join(f"quality.{c} IS NULL" for c in TRUST_VALUES)
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in ("run_id", "split", "image_index", "method"))
    return f"(run_id, split, image_index, method) DO UPDATE SET {updates} WHERE {incomplete}"


def quality_rows(conn, run_id, split, method, image_indices=None):
    """Stored quality rows for these images (all of the run's if None), curves decoded to float32
    arrays, stages to a dict."""
    sql, params = "SELECT * FROM quality WHERE run_id = ? AND split = ? AND method = ?", [run_id, split, method]
    rows = (conn.execute(sql, params).fetchall() if image_indices is None
            else select_in(conn, sql + " AND image_index IN ({})", params, image_indices))
    out = []
    for r in sorted(rows, key=lambda r: r["image_index"]):
        d = dict(r)
        for c in QUALITY_CURVES:
            d[c] = np.frombuffer(d[c], "<f4")
        d["randomization_stages"] = json.loads(d["randomization_stages"])
        d["randomization"] = json.loads(d["randomization"]) if d.get("randomization") else None
        out.append(d)
    return out


def set_metrics(conn, run_id, metrics):
    with write_errors(conn), conn:
        conn.execute("UPDATE runs SET metrics = ?, updated_at = ? WHERE run_id = ?",
                     (json.dumps(metrics, sort_keys=True), now(), run_id))


# ----------------------------------------------------------------------------- reading

def get_run(conn, run_id=None):
    """A run as a dict (JSON columns parsed, plus a `provenance` dict); the latest if run_id is None."""
    if run_id is None:
        row = conn.execute("SELECT * FROM runs ORDER BY run_id DESC LIMIT 1").fetchone()
    else:
        row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        raise DBError("The database holds no runs yet." if run_id is None else f"No run {run_id} in the database.")
    run = dict(row)
    for key in ("model_config", "class_names", "ig_settings", "metrics"):
        run[key] = json.loads(run[key]) if run[key] else None
    run["provenance"] = {"dataset": run["dataset"], "flag": run["flag"], "size": run["size"],
                         "file": run["data_file"], "md5": run["data_md5"],
                         "synthetic": bool(run["synthetic"]), "verified": bool(run["data_verified"])}
    return run


def row_to_dict(row):
    d = dict(row)
    if "attribution" in d:
        d["attribution"] = decode_array(d["attribution"], d["attr_dtype"], d["attr_shape"])
    if "probs" in d:
        d["probs"] = np.frombuffer(d["probs"], dtype="<f4")
    if d.get("true_labels") is not None:
        d["true_labels"] = np.frombuffer(d["true_labels"], dtype=np.uint8)
    return d


def true_classes(row):
    """A stored row's truth as plots.panel_title takes it: the true class, or for multi-label data
    the list of its true labels (empty for an image without a finding)."""
    if row.get("true_labels") is None:
        return row["true_label"]
    return np.flatnonzero(row["true_labels"]).tolist()  # decoded by row_to_dict


def get_explanation(conn, run_id, split, image_index, method="ig"):
    row = conn.execute("SELECT * FROM explanations WHERE run_id = ? AND split = ? AND image_index = ? "
                       "AND method = ?", (run_id, split, image_index, method)).fetchone()
    if row is None:
        stored = sorted(done_indices(conn, run_id, split, method))
        shown = ", ".join(map(str, stored[:20])) + (f", ... ({len(stored)} in all)" if len(stored) > 20 else "")
        raise DBError(f"Run {run_id} has no stored {method} explanation for {split} image {image_index}. "
                      f"Stored {split} images: {shown or 'none'}. `python db.py DB` summarises the store.")
    return row_to_dict(row)


def attribution(conn, run_id, split, image_index, method="ig"):
    """One stored attribution map as a numpy array of shape (C, H, W), read the same way for every method."""
    return get_explanation(conn, run_id, split, image_index, method)["attribution"]


# find()'s filters: name -> the SQL clause its value goes into
FILTERS = {"split": "split = ?", "misclassified": "correct = ?", "true_label": "true_label = ?",
           "pred_label": "pred_label = ?",
           "min_confidence": "confidence >= ?", "max_confidence": "confidence <= ?"}


def find(conn, run_id, method="ig", image_indices=None, order="index", limit=None, with_arrays=False, **filters):
    """Stored explanations of `method` (of `image_indices`, or all) matching every filter given
    (FILTERS: split, "test" unless given; misclassified, true_label, pred_label, min_confidence,
    max_confidence), as dicts (arrays decoded if with_arrays)."""
    unknown = set(filters) - set(FILTERS)
    if unknown:
        raise TypeError(f"find() has no filter {sorted(unknown)}; filters: {sorted(FILTERS)}")
    where, params = ["run_id = ?", "method = ?"], [run_id, method]
    for name, value in {"split": "test", **filters}.items():
        if value is not None:
            where.append(FILTERS[name])
            params.append((0 if value else 1) if name == "misclassified" else value)
    columns = "*" if with_arrays else ", ".join(c for c in EXPLANATION_COLUMNS
                                                if c not in ("probs", "attribution"))
    sql = f"SELECT {columns} FROM explanations WHERE {' AND '.join(where)}"
    column, descending = ORDERS[order]
    if image_indices is None:
        rows = conn.execute(f"{sql} ORDER BY {column}{' DESC' if descending else ''}, image_index"
                            + (" LIMIT ?" if limit else ""), params + ([int(limit)] if limit else [])).fetchall()
    else:  # queried in chunks, so sorted here, by the same rule
        sign = -1 if descending else 1
        rows = sorted(select_in(conn, sql + " AND image_index IN ({})", params, image_indices),
                      key=lambda r: (sign * r[column], r["image_index"]))[:limit]
    return [row_to_dict(r) for r in rows]


def select_in(conn, sql, params, values, chunk=500):
    """Rows of `sql` (with one '{}' for IN's placeholders) for all `values`, queried in chunks: SQLite
    builds before 3.32 allow only 999 parameters per statement."""
    values = [int(v) for v in values]
    rows = []
    for i in range(0, len(values), chunk):
        part = values[i:i + chunk]
        rows += conn.execute(sql.format(", ".join("?" * len(part))), [*params, *part]).fetchall()
    return rows


def class_attributions(conn, run_id, label, split="test", method="ig"):
    """Every stored attribution of one true class, stacked into (N, C, H, W)."""
    rows = conn.execute("SELECT attribution, attr_dtype, attr_shape FROM explanations "
                        "WHERE run_id = ? AND split = ? AND method = ? AND true_label = ? ORDER BY image_index",
                        (run_id, split, method, label)).fetchall()
    return np.stack([decode_array(*r) for r in rows]) if rows else np.empty((0,))


def summary(conn, describe, relative_error):
    """A human-readable summary of every run in the store; describe(provenance) names a dataset and
    relative_error(delta, gap) is IG's completeness error (attribution.relative_completeness_error,
    passed in so that this module needs no torch)."""
    conn.create_function("relative_error", 2, lambda d, g: float(relative_error(np.float64(d), np.float64(g))),
                         deterministic=True)
    lines = []
    for (run_id,) in conn.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall():
        run = get_run(conn, run_id)
        lines.append(f"run {run_id}: {describe(run['provenance'])}, data MD5 "
                     f"{run['data_md5']}, checkpoint sha256 {run['checkpoint_sha256'][:12]}…, "
                     f"created {run['created_at']}")
        lines.append(f"  IG settings: {json.dumps(run['ig_settings'], sort_keys=True)}")
        if run["metrics"]:
            m = run["metrics"]
            lines.append(f"  test metrics: ACC {formats.metric(m['acc'])}  AUC {formats.metric(m['auc'])}"
                         f"  (TTA {'on' if m['tta'] else 'off'})")
        stats = conn.execute(
            "SELECT split, COUNT(*), AVG(correct), AVG(ABS(delta)), "
            "AVG(relative_error(delta, score - baseline_score)) FROM explanations "
            "WHERE run_id = ? AND method = 'ig' AND split NOT LIKE ? GROUP BY split",
            (run_id, SLIDE_SPLIT + "%")).fetchall()
        for split, n, acc, mean_delta, rel in stats:
            lines.append(f"  {split}: {formats.count(n)} explanations, accuracy of stored rows {formats.metric(acc)}, "
                         f"mean |delta| {formats.measure(mean_delta)}, mean relative completeness error "
                         f"{formats.share(rel)}")
            # Multi-label rows have no single true class: group them by the predicted label instead.
            multi = run["task"].startswith("multi-label")
            by, what = ("pred_label", "top label right") if multi else ("true_label", "accuracy")
            per_class = conn.execute(
                f"SELECT {by}, COUNT(*), AVG(correct) FROM explanations "
                f"WHERE run_id = ? AND split = ? AND method = 'ig' GROUP BY {by} ORDER BY {by}",
                (run_id, split)).fetchall()
            if by == "pred_label":
                lines.append("    by predicted (highest-scoring) label:")
            for label, count, class_acc in per_class:
                name = run["class_names"][label]
                lines.append(f"    {label} {name:38s} {count:6d} rows  {what} {formats.metric(class_acc)}")
        slides = conn.execute(  # tiles with a stored map, not only placed (a run stopped before their batch)
            "SELECT t.slide_file, COUNT(*) FROM slide_tiles t JOIN explanations e ON e.run_id = t.run_id AND "
            "e.split = t.split AND e.image_index = t.image_index AND e.method = 'ig' WHERE t.run_id = ? "
            "GROUP BY t.slide_md5, t.slide_file ORDER BY t.slide_file", (run_id,)).fetchall()
        if slides:  # tiles have no true class: no accuracy
            lines.append("  slide tiles explained (slide.py): "
                         + ", ".join(f"{f} {formats.count(n)}" for f, n in slides))
        others = conn.execute("SELECT method, COUNT(*) FROM explanations WHERE run_id = ? AND method != 'ig' "
                              "AND split NOT LIKE ? GROUP BY method ORDER BY method",
                              (run_id, SLIDE_SPLIT + "%")).fetchall()
        if others:
            lines.append("  other methods' maps: " + ", ".join(f"{m} {n}" for m, n in others))
        quality = conn.execute(
            "SELECT method, COUNT(*), AVG(deletion_auc), AVG(deletion_auc_random), AVG(insertion_auc), "
            "AVG(insertion_auc_random), AVG(randomization_spearman) FROM quality WHERE run_id = ? "
            "GROUP BY method ORDER BY method", (run_id,)).fetchall()
        for method, n, dele, dele_r, ins, ins_r, rho in quality:
            lines.append(f"  quality {method}: {n} images, deletion AUC {formats.measure(dele)} (random "
                         f"{formats.measure(dele_r)}), insertion AUC {formats.measure(ins)} (random "
                         f"{formats.measure(ins_r)}), randomised |map| Spearman {formats.measure(rho)}")
    return "\n".join(lines) if lines else "The database holds no runs yet."


def main(argv=None):
    p = argparse.ArgumentParser(description="Summarise an attribution store written by evaluate.py.")
    p.add_argument("db", help="path to the SQLite file (default location: <run dir>/explanations.db)")
    conn = connect(p.parse_args(argv).db, create=False)
    from attribution import relative_completeness_error  # here, so that the module itself needs no torch
    from datasets import describe
    print(summary(conn, describe, relative_completeness_error))


if __name__ == "__main__":
    cli.run(main)
