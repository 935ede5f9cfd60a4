"""shards.py: evaluate.py's explanation passes under torchrun, shared out over the ranks and merged.

    shards.sharded_explanations(ctx, explaining, scoring, indices, quality_idx, db_path, run_key, shard_dir)

The images still missing a map are dealt to the ranks in Explaining.batch's blocks, then those
missing quality rows in quality.quality_block's blocks (the batches one process makes, so seeded
measures come out the same); each rank writes its own shard store on local disk (shard_dir), then
rank 0 merges every shard into the one store (rows keyed as always, so a merge is idempotent) and the
shards are deleted. Leftovers of a killed run are merged by the rerun.
"""
import hashlib
import math
from pathlib import Path

import db
import distributed
import explanations
import quality

MERGE_IMAGES = 32  # images' rows a rank sends to rank 0 per merge round


def sharded_explanations(ctx, explaining, scoring, indices, quality_idx, db_path, run_key, shard_dir):
    """evaluate.py's explanation and quality passes under torchrun, in two sharded passes: the maps
    (in explaining.batch's blocks), then the quality rows (in quality.quality_block's), so every batch
    holds the images it would in a single process and seeded measures come out the same. `run_key`
    is db.run_id_for's arguments after the connection."""
    conn = run_id = pending = None  # rank 0's: the one store and what it lacks
    if ctx.main:
        conn = db.connect(db_path)
        run_id = db.run_id_for(conn, *run_key)
        pending = explanations.lacking(indices, [db.done_indices(conn, run_id, "test", m)
                                                 for m in explaining.methods])
        print(f"Sharding over {ctx.world_size} ranks, shard stores in {shard_dir}: maps for {len(pending)} "
              f"of {len(indices)} images")
    tag = distributed.broadcast(hashlib.sha256(str(db_path.resolve()).encode()).hexdigest()[:16], ctx)
    shard_path = Path(shard_dir) / f"{tag}-rank{ctx.rank}.db"

    def maps(shard, shard_run, mine):
        explanations.explain_methods(explaining, mine, shard, shard_run)
    sharded(ctx, conn, run_id, pending, explaining.batch, shard_path, run_key, maps)

    if ctx.main:
        pending = explanations.lacking(quality_idx, [db.done_quality(conn, run_id, "test", m)
                                                     for m in scoring.explainers])
        print(f"Quality for {len(pending)} of {len(quality_idx)} images")

    def scores(shard, shard_run, mine):
        quality.quality_into_db(scoring, mine, shard, shard_run)
    sharded(ctx, conn, run_id, pending, quality.quality_block(scoring.model, scoring.split, ctx.device), shard_path,
            run_key, scores)
    if ctx.main:
        db.close(conn)


def sharded(ctx, conn, run_id, pending, block, shard_path, run_key, work):
    """One sharded pass. Rank 0 deals the `pending` images out in blocks of `block` and copies each
    rank the store's rows of its images; each rank runs work(shard, shard_run, its images) into its
    own shard store at `shard_path`, sends every row it holds (rows a killed run left included) to
    rank 0 in rounds of MERGE_IMAGES images, and rank 0 stores them (keys already stored are kept,
    so merging twice changes nothing); then the shards are deleted."""
    pending = distributed.broadcast(pending, ctx)
    if not pending and not distributed.max_all(shard_path.exists(), ctx):  # nothing to do, nothing left over
        return
    share = [distributed.blocks(pending, block, r, ctx.world_size) for r in range(ctx.world_size)]
    seed_rows = distributed.scatter([db.export_rows(conn, run_id, s) for s in share] if ctx.main else None, ctx)
    shard = db.connect(shard_path)
    shard_run = db.run_id_for(shard, *run_key)
    db.import_rows(shard, shard_run, seed_rows)
    work(shard, shard_run, share[ctx.rank])
    stored = db.stored_images(shard, shard_run)
    added = 0
    for k in range(math.ceil(distributed.max_all(len(stored), ctx) / MERGE_IMAGES)):
        part = db.export_rows(shard, shard_run, stored[k * MERGE_IMAGES:(k + 1) * MERGE_IMAGES])
        for rows in distributed.gather(part, ctx) or []:
            added += db.import_rows(conn, run_id, rows)
    distributed.barrier(ctx)  # every shard is in the store: the shards can go
    db.close(shard)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{shard_path}{suffix}").unlink(missing_ok=True)
    print(f"Merged {added} new rows from {ctx.world_size} shard stores")
