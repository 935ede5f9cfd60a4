"""db.py: schema checks, binary round trips, idempotent batched writes, queries."""
import sqlite3

import numpy as np
import pytest

import db

PROVENANCE = {"dataset": "pathmnist-synthetic", "size": 28, "file": "x.npz", "md5": "m", "synthetic": True}


def new_run(conn, settings=None):
    return db.run_id_for(conn, "sha", "ckpt.pt", {"n_classes": 9}, [f"c{i}" for i in range(9)],
                         PROVENANCE, settings or {"n_steps": 16})


def fake_rows(run_id, indices, seed=0, dtype="float16"):
    rng = np.random.default_rng(seed)
    rows = []
    for i in indices:
        blob, dt, shape = db.encode_array(rng.normal(size=(3, 28, 28)), dtype)
        probs = rng.dirichlet(np.ones(9)).astype("<f4")
        rows.append({"run_id": run_id, "split": "test", "image_index": i, "true_label": i % 9,
                     "pred_label": int(probs.argmax()), "target": int(probs.argmax()),
                     "confidence": float(probs.max()), "probs": probs.tobytes(), "attribution": blob,
                     "attr_dtype": dt, "attr_shape": shape, "delta": 0.01 * i, "score": 2.0,
                     "baseline_score": 0.5, "n_steps": 8})
    return rows


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_attribution_round_trip_gives_identical_bytes(tmp_path, dtype):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    rows = fake_rows(run, [5], dtype=dtype)
    db.insert_explanations(conn, rows)
    back = db.attribution(conn, run, "test", 5)
    assert back.dtype == np.dtype(dtype) and back.shape == (3, 28, 28)
    assert back.astype(back.dtype.newbyteorder("<")).tobytes() == rows[0]["attribution"]


def test_attribution_is_stored_as_compact_binary_not_text(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    db.insert_explanations(conn, fake_rows(new_run(conn), [0]))
    kind, size = conn.execute("SELECT typeof(attribution), length(attribution) FROM explanations").fetchone()
    assert kind == "blob" and size == 3 * 28 * 28 * 2


def test_inserting_the_same_rows_again_adds_nothing(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    assert db.insert_explanations(conn, fake_rows(run, range(10))) == 10
    assert db.insert_explanations(conn, fake_rows(run, range(5, 15))) == 5
    assert conn.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == 15


def test_same_checkpoint_and_settings_reuse_the_run(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    assert new_run(conn) == new_run(conn)
    assert new_run(conn, {"n_steps": 32}) != new_run(conn)


def test_store_uses_wal_foreign_keys_and_records_its_schema_version(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
    with pytest.raises(sqlite3.IntegrityError):
        db.insert_explanations(conn, fake_rows(999, [0]))  # no such run


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "e.db"
    db.connect(path).execute(f"PRAGMA user_version = {db.SCHEMA_VERSION + 1}")
    with pytest.raises(db.DBError, match="newer version"):
        db.connect(path)


def test_foreign_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE notes (x)")
    with pytest.raises(db.DBError, match="schema version 0"):
        db.connect(path)


def test_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are notes, not a database" * 20)
    with pytest.raises(db.DBError, match="not an SQLite database"):
        db.connect(path)


def test_missing_database_is_not_created_when_reading(tmp_path):
    with pytest.raises(db.DBError, match="evaluate.py"):
        db.connect(tmp_path / "none.db", create=False)
    assert not (tmp_path / "none.db").exists()


def test_queries_filter_by_correctness_class_and_confidence(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    rows = fake_rows(run, range(40))
    db.insert_explanations(conn, rows)
    wrong = {r["image_index"] for r in rows if r["true_label"] != r["pred_label"]}
    assert {r["image_index"] for r in db.find(conn, run, misclassified=True)} == wrong
    assert {r["image_index"] for r in db.find(conn, run, true_label=3)} == {3, 12, 21, 30, 39}
    confident = db.find(conn, run, min_confidence=0.3, order="-confidence")
    assert [r["confidence"] for r in confident] == sorted(
        (r["confidence"] for r in rows if r["confidence"] >= 0.3), reverse=True)
    assert len(db.find(conn, run, limit=3)) == 3


def test_class_attributions_stack_every_row_of_that_class(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    db.insert_explanations(conn, fake_rows(run, range(20)))
    assert db.class_attributions(conn, run, 2).shape == (2, 3, 28, 28)  # images 2 and 11


def test_summary_reports_rows_per_class_accuracy_and_delta(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    db.insert_explanations(conn, fake_rows(new_run(conn), range(18)))
    text = db.summary(conn)
    assert "SYNTHETIC" in text and "18 explanations" in text and "mean |delta|" in text
    assert "c4" in text and "2 rows" in text


def test_queries_by_image_index_work_beyond_sqlites_old_parameter_limit(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    db.insert_explanations(conn, fake_rows(run, range(1200)))
    rows = db.find(conn, run, image_indices=list(range(1199, -1, -1)), order="-confidence", limit=1100)
    assert len(rows) == 1100
    assert [r["confidence"] for r in rows] == sorted((r["confidence"] for r in rows), reverse=True)
