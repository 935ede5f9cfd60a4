"""db.py: schema checks, binary round trips, idempotent batched writes, queries."""
import json
import sqlite3

import numpy as np
import pytest

import attribution as attr
import db

PROVENANCE = {"dataset": "pathmnist-synthetic", "size": 28, "file": "x.npz", "md5": "m", "synthetic": True,
              "flag": "pathmnist", "verified": True}


def new_run(conn, settings=None):
    return db.run_id_for(conn, "sha", "ckpt.pt", {"n_classes": 9, "task": "multi-class"}, [f"c{i}" for i in range(9)],
                         PROVENANCE, settings or {"n_steps": 16})


def fake_rows(run_id, indices, seed=0, dtype="float16", method="ig"):
    """Rows for `indices` built by db.explanation_rows: true label i % 9, target = prediction,
    delta 0.01 * i, score 2.0, baseline score 0.5."""
    rng = np.random.default_rng(seed)
    n = len(indices)
    probs = rng.dirichlet(np.ones(9), size=n).astype("<f4")
    terms = ({"delta": [0.01 * i for i in indices], "score": [2.0] * n, "baseline_score": [0.5] * n, "n_steps": [8] * n}
             if method == "ig" else {"score": [2.0] * n})
    return db.explanation_rows(run_id, "test", method, {
        "image_index": list(indices), "true_label": [i % 9 for i in indices], "probs": probs,
        "target": probs.argmax(1), "attributions": rng.normal(size=(n, 3, 28, 28)).astype(dtype), **terms})


def describe(provenance):
    return f"<{provenance['dataset']} {provenance['size']} synthetic={provenance['synthetic']}>"


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
    with pytest.raises(db.DBError, match="FOREIGN KEY"):
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
    text = db.summary(conn, describe, attr.relative_completeness_error)
    assert "<pathmnist-synthetic 28 synthetic=True>" in text  # the dataset label is the caller's
    assert "18 explanations" in text and "mean |delta|" in text
    assert "c4" in text and "2 rows" in text


def test_queries_by_image_index_work_beyond_sqlites_old_parameter_limit(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    db.insert_explanations(conn, fake_rows(run, range(1200)))
    rows = db.find(conn, run, image_indices=list(range(1199, -1, -1)), order="-confidence", limit=1100)
    assert len(rows) == 1100
    assert [r["confidence"] for r in rows] == sorted((r["confidence"] for r in rows), reverse=True)


def test_rows_take_prediction_and_confidence_from_the_probabilities():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    rows = db.explanation_rows(1, "test", "ig", {
        "image_index": [4, 9], "true_label": [1, 2], "probs": probs, "target": [2, 0],
        "attributions": np.zeros((2, 3, 28, 28), np.float16), "delta": [0.0, 0.1], "score": [1.0, 2.0],
        "baseline_score": [0.0, 0.5], "n_steps": [8, 16]})
    assert [(r["image_index"], r["true_label"], r["pred_label"], r["target"]) for r in rows] == [
        (4, 1, 1, 2), (9, 2, 0, 0)]
    assert [r["confidence"] for r in rows] == pytest.approx([0.7, 0.5])
    assert rows[1]["n_steps"] == 16 and rows[1]["attr_dtype"] == "float16"
    assert np.frombuffer(rows[0]["probs"], "<f4").tolist() == pytest.approx([0.1, 0.7, 0.2])


# ----------------------------------------------------------------------------- migrations

def v1_database(path):
    conn = sqlite3.connect(path)
    conn.executescript(db.SCHEMA_V1 + "PRAGMA user_version = 1;")
    conn.execute("INSERT INTO runs (checkpoint_sha256, checkpoint_path, model_config, class_names, dataset, "
                 "size, data_file, data_md5, synthetic, ig_settings, created_at, updated_at) "
                 "VALUES ('s', 'p', '{}', '[]', 'd', 28, 'f', 'm', 1, '{}', 't', 't')")
    conn.commit()
    return conn


def test_a_version_1_database_is_migrated_keeping_its_rows(tmp_path):
    v1_database(tmp_path / "v1.db").close()
    migrated = db.connect(tmp_path / "v1.db")
    assert migrated.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION == 9
    assert migrated.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
    assert "quality" in db.table_names(migrated)


def test_version_2_randomisation_lists_gain_their_layer_names(tmp_path):
    conn = v1_database(tmp_path / "v2.db")
    conn.executescript(f"BEGIN; {db.MIGRATIONS[1]} PRAGMA user_version = 2; COMMIT;")
    values = [0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    conn.execute("INSERT INTO quality (run_id, split, image_index, method, relative_error, deletion_auc, "
                 "deletion_auc_random, insertion_auc, insertion_auc_random, infidelity, sensitivity_max, "
                 "randomization_spearman, randomization_spearman_signed, randomization_input_spearman, "
                 "deletion_curve, deletion_curve_random, insertion_curve, insertion_curve_random, "
                 "randomization_stages) VALUES (1, 'test', 0, 'ig', 0, 0, 0, 0, 0, 0, 0, 0.3, 0, 0, "
                 "x'00', x'00', x'00', x'00', ?)", (json.dumps(values),))
    conn.commit()
    conn.close()
    migrated = db.connect(tmp_path / "v2.db")
    stored = json.loads(migrated.execute("SELECT randomization_stages FROM quality").fetchone()[0])
    assert stored == {"classifier": 0.8, "conv block 5": 0.7, "conv block 4": 0.6, "conv block 3": 0.5,
                      "conv block 2": 0.4, "conv block 1": 0.3}


def test_version_3_rows_gain_a_correct_flag_and_pathmnist_run_columns(tmp_path):
    conn = v1_database(tmp_path / "v3.db")
    conn.executescript(f"BEGIN; {db.MIGRATIONS[1]} PRAGMA user_version = 3; COMMIT;")
    for index, (true, pred) in enumerate([(2, 2), (2, 5)]):
        conn.execute("INSERT INTO explanations (run_id, split, image_index, true_label, pred_label, target, "
                     "confidence, probs, attribution, attr_dtype, attr_shape, delta, score, baseline_score, "
                     "n_steps) VALUES (1, 'test', ?, ?, ?, 0, 0.5, x'00', x'00', 'float16', '1', 0, 1, 0, 8)",
                     (index, true, pred))
    conn.commit()
    conn.close()
    migrated = db.connect(tmp_path / "v3.db")
    assert [r[0] for r in migrated.execute("SELECT correct FROM explanations ORDER BY image_index")] == [1, 0]
    run = db.get_run(migrated, 1)
    assert (run["flag"], run["task"], run["provenance"]["verified"]) == ("pathmnist", "multi-class", True)


UNDO_V9 = "DROP TABLE slide_tiles;"  # back to a v8 store
UNDO_V7 = UNDO_V9 + "".join(f"ALTER TABLE quality DROP COLUMN {c};" for c in db.TRUST_VALUES)  # back to v6


def test_version_5_ig_settings_are_renamed_and_the_run_is_found_again(tmp_path):
    new = {"attribute": "logit", "baseline": "mean", "n_steps": 8, "rule": "gausslegendre"}
    conn = db.connect(tmp_path / "v5.db")
    run = new_run(conn, new)
    old = json.dumps({"baseline": "mean", "method": "gausslegendre", "n_steps": 8, "output": "logit"},
                     sort_keys=True)  # as version 5 stored them
    with conn:
        conn.execute("UPDATE runs SET ig_settings = ?", (old,))
    conn.executescript(UNDO_V7 + "PRAGMA user_version = 5;")
    conn.close()
    migrated = db.connect(tmp_path / "v5.db")
    assert db.get_run(migrated, run)["ig_settings"] == new
    assert new_run(migrated, new) == run  # the same run: a rerun computes nothing again


def test_version_7_randomisation_stages_take_the_names_metrics_and_figures_use(tmp_path):
    conn = db.connect(tmp_path / "v7.db")
    run = new_run(conn)
    row = fake_quality_rows(run, [0])[0]
    row["randomization_stages"] = {"classifier": 0.5, "features.0": 0.25}  # as version 7 stored them
    row["randomization"] = {"top_down": {"classifier": {"ssim": 0.5}, "features.0": {"ssim": 0.25}},
                            "single": {"net.layer4": {"ssim": 0.75}}}
    db.insert_quality(conn, [row])
    conn.executescript(UNDO_V9 + "PRAGMA user_version = 7;")
    conn.close()
    back = db.quality_rows(db.connect(tmp_path / "v7.db"), run, "test", "ig")[0]
    assert back["randomization_stages"] == {"classifier": 0.5, "conv block 1": 0.25}
    assert back["randomization"] == {"top_down": {"classifier": {"ssim": 0.5}, "conv block 1": {"ssim": 0.25}},
                                     "single": {"layer4": {"ssim": 0.75}}}


def test_version_4_rows_become_ig_rows_keyed_by_method_with_every_value_kept(tmp_path):
    conn = db.connect(tmp_path / "v4.db")
    run = new_run(conn)
    db.insert_explanations(conn, fake_rows(run, range(5)))
    before = [tuple(r) for r in conn.execute("SELECT * FROM explanations ORDER BY image_index")]
    conn.close()
    old = sqlite3.connect(tmp_path / "v4.db")  # rebuild the v4 table from the v5 rows
    old.executescript("""BEGIN;
        CREATE TABLE e4 AS SELECT run_id, split, image_index, true_label, pred_label, target, confidence,
            probs, attribution, attr_dtype, attr_shape, delta, score, baseline_score, n_steps, true_labels,
            correct FROM explanations;
        DROP TABLE explanations; ALTER TABLE e4 RENAME TO explanations;
        ALTER TABLE quality DROP COLUMN randomization; """ + UNDO_V7 + """ PRAGMA user_version = 4; COMMIT;""")
    old.close()
    migrated = db.connect(tmp_path / "v4.db")
    after = [tuple(r) for r in migrated.execute("SELECT * FROM explanations ORDER BY image_index")]
    assert after == before and {r[3] for r in after} == {"ig"}
    db.insert_explanations(migrated, fake_rows(run, range(5), method="saliency"))  # a second method, same images
    assert db.explanation_methods(migrated, run) == ["ig", "saliency"] and count(migrated) == 10


def test_maps_of_every_method_read_back_the_same_way(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    ig, gradcam = fake_rows(run, range(3), seed=1), fake_rows(run, range(3), seed=2, method="gradcam")
    db.insert_explanations(conn, ig + gradcam)
    for rows, method in ((ig, "ig"), (gradcam, "gradcam")):
        expected = db.decode_array(rows[2]["attribution"], rows[2]["attr_dtype"], rows[2]["attr_shape"])
        assert np.array_equal(db.attribution(conn, run, "test", 2, method), expected)
    assert db.find(conn, run, method="gradcam")[0]["delta"] is None
    assert len(db.find(conn, run)) == 3 and len(db.find(conn, run, method="gradcam")) == 3


# ----------------------------------------------------------------------------- multi-label rows

def multi_label_rows(run_id):
    """Three images, two labels: image 0 has label 0 and the model's top label is 0 (70%); image 1
    has none and no label reaches 0.5; image 2 has label 1 but the top label is 0 (60%)."""
    probs = np.array([[.7, .2], [.3, .1], [.6, .4]], "<f4")
    return db.explanation_rows(run_id, "test", "ig", {
        "image_index": [0, 1, 2], "true_label": np.array([[1, 0], [0, 0], [0, 1]]), "probs": probs,
        "target": [0, 0, 0], "attributions": np.zeros((3, 1, 28, 28), "float16"), "delta": [0.0] * 3,
        "score": [1.0] * 3, "baseline_score": [0.0] * 3, "n_steps": [8] * 3})


def test_multi_label_rows_keep_every_true_label_and_say_whether_the_top_one_is_right(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    db.insert_explanations(conn, multi_label_rows(run))
    rows = db.find(conn, run, with_arrays=True)
    assert [r["true_labels"].tolist() for r in rows] == [[1, 0], [0, 0], [0, 1]]
    assert [r["true_label"] for r in rows] == [-1, -1, -1]
    assert [r["image_index"] for r in db.find(conn, run, misclassified=True)] == [2]
    assert [r["image_index"] for r in db.find(conn, run, misclassified=False)] == [0, 1]


# ----------------------------------------------------------------------------- whole batches or nothing

def count(conn, table="explanations"):
    return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_a_batch_is_one_transaction(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    statements = []
    conn.set_trace_callback(statements.append)
    db.insert_explanations(conn, fake_rows(run, range(10)))
    db.insert_quality(conn, fake_quality_rows(run, range(10)))
    assert [s.strip() for s in statements if s.strip() in ("BEGIN", "COMMIT")] == ["BEGIN", "COMMIT"] * 2


def test_a_batch_with_one_bad_row_stores_none_of_it_and_says_why(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    rows = fake_rows(run, range(5))
    rows[3]["n_steps"] = None  # IG's rows must carry their completeness terms
    with pytest.raises(db.DBError, match="none of it: CHECK constraint failed"):
        db.insert_explanations(conn, rows)
    assert count(conn) == 0


@pytest.mark.parametrize("column", ["delta", "score", "confidence"])
def test_a_nan_value_is_refused_naming_the_image_and_nothing_is_stored(tmp_path, column):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    rows = fake_rows(run, range(5))
    rows[2][column] = float("nan")
    with pytest.raises(db.DBError, match=f"NaN or inf .*\\(2, '{column}'\\)"):
        db.insert_explanations(conn, rows)
    assert count(conn) == 0


def test_a_nan_or_overflowing_attribution_is_refused(tmp_path):
    attributions = np.zeros((3, 3, 28, 28), np.float32)
    attributions[1, 0, 5, 5] = 1e6  # beyond float16's range: inf once converted for storage
    with np.errstate(over="ignore"):
        attributions = attributions.astype(np.float16)
    with pytest.raises(db.DBError, match=r"image\(s\) \[11\] hold NaN or inf.*--attr-dtype float32"):
        db.explanation_rows(1, "test", "ig", {
            "image_index": [10, 11, 12], "true_label": [0, 0, 0], "probs": np.full((3, 9), 1 / 9),
            "target": [0, 0, 0], "attributions": attributions, "delta": [0.0] * 3, "score": [1.0] * 3,
            "baseline_score": [0.0] * 3, "n_steps": [8] * 3})


def test_a_nan_quality_value_is_refused_and_nothing_is_stored(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    rows = fake_quality_rows(run, range(4))
    rows[1]["infidelity"] = float("nan")
    with pytest.raises(db.DBError, match="infidelity"):
        db.insert_quality(conn, rows)
    assert count(conn, "quality") == 0


def test_quality_rows_round_trip(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    assert db.insert_quality(conn, fake_quality_rows(run, range(4))) == 4
    back = db.quality_rows(conn, run, "test", "ig", [2])[0]
    assert back["deletion_auc"] == pytest.approx(0.1) and back["mask_mass"] is None  # the 2nd value
    assert back["randomization_stages"] == {"classifier": 0.5, "conv block 1": 0.25}
    assert back["insertion_curve"].tolist() == pytest.approx(np.linspace(0, 1, 29).tolist())


def test_quality_rows_stored_before_the_published_tests_are_completed_and_complete_ones_kept(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    old = fake_quality_rows(run, range(3))
    for row in old[:2]:  # as schema v6 stored them: no published tests
        row.update(dict.fromkeys(db.TRUST_VALUES))
    db.insert_quality(conn, old)
    assert db.done_quality(conn, run, "test", "ig") == {2}  # the incomplete ones are to do
    again = fake_quality_rows(run, range(3))
    for row in again:
        row["deletion_auc"] = 0.9
    assert db.insert_quality(conn, again) == 2
    back = {r["image_index"]: r for r in db.quality_rows(conn, run, "test", "ig")}
    assert [back[i]["deletion_auc"] for i in range(3)] == pytest.approx([0.9, 0.9, 0.1])  # image 2 kept as it was
    assert all(back[i]["road_morf"] is not None for i in range(3))
    assert db.done_quality(conn, run, "test", "ig") == {0, 1, 2}


def fake_quality_rows(run_id, indices):
    values = {c: 0.1 * i for i, c in enumerate(db.QUALITY_VALUES)}
    values.update(mask_mass=None, mask_area=None)
    return [{"run_id": run_id, "split": "test", "image_index": i, "method": "ig", **values,
             **{c: np.linspace(0, 1, 29) for c in db.QUALITY_CURVES},
             "randomization_stages": {"classifier": 0.5, "conv block 1": 0.25}} for i in indices]


# ----------------------------------------------------------------------------- reading changes nothing

def test_reading_an_empty_file_says_so_and_leaves_it_empty(tmp_path):
    (tmp_path / "e.db").touch()
    with pytest.raises(db.DBError, match="is empty") as err:
        db.connect(tmp_path / "e.db", create=False)
    assert "--db" not in str(err.value)  # readers such as db.py have no such flag
    assert (tmp_path / "e.db").stat().st_size == 0


def test_reading_an_older_store_never_migrates_it(tmp_path):
    v1_database(tmp_path / "v1.db").close()
    before = (tmp_path / "v1.db").read_bytes()
    with pytest.raises(db.DBError, match="run evaluate.py once"):
        db.connect(tmp_path / "v1.db", create=False)
    assert (tmp_path / "v1.db").read_bytes() == before


def test_a_reader_cannot_write(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    new_run(conn)
    conn.close()
    reader = db.connect(tmp_path / "e.db", create=False)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("DELETE FROM runs")


def test_a_missing_explanation_names_the_stored_ones(tmp_path):
    conn = db.connect(tmp_path / "e.db")
    run = new_run(conn)
    db.insert_explanations(conn, fake_rows(run, [4, 8, 15]))
    with pytest.raises(db.DBError, match=r"no stored ig explanation for test image 0\. Stored test images: 4, 8, 15\."):
        db.get_explanation(conn, run, "test", 0)


def test_db_cli_on_an_empty_file_exits_1_and_leaves_it_empty(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    (tmp_path / "e.db").touch()
    result = subprocess.run([sys.executable, "db.py", str(tmp_path / "e.db")], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "is empty" in result.stderr and "no runs yet" not in result.stdout
    assert (tmp_path / "e.db").stat().st_size == 0


def test_a_version_8_store_gains_the_slide_tiles_table_keeping_its_rows(tmp_path):
    conn = sqlite3.connect(tmp_path / "v8.db")
    for version in range(8):  # the store as the version-8 code left it
        db.migrate(conn, version)
    run = new_run(conn, {"n_steps": 8})
    db.insert_explanations(conn, fake_rows(run, range(3)))
    before = [tuple(r) for r in conn.execute("SELECT * FROM explanations ORDER BY image_index")]
    conn.close()
    migrated = db.connect(tmp_path / "v8.db")
    assert [tuple(r) for r in migrated.execute("SELECT * FROM explanations ORDER BY image_index")] == before
    assert "slide_tiles" in db.table_names(migrated) and migrated.execute("PRAGMA user_version").fetchone()[0] == 9


def test_a_schema_step_another_process_already_took_is_skipped(tmp_path):
    path = tmp_path / "store.db"
    db.close(db.connect(path))  # one process creates the store
    late = sqlite3.connect(path)  # another saw the empty file a moment before, and goes on
    db.migrate(late, 0)
    db.migrate(late, 4)
    assert late.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
    late.close()
    assert db.find(db.connect(path, create=False), 1) == []
