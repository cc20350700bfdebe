"""Exact batched evaluation of a train state on a split: every image counted once."""

from __future__ import annotations

import jax
import numpy as np

from springfield import parallel
from springfield.data.pipeline import eval_dataset, to_iterator
from springfield.data.prepare import Split


def run_eval(
    eval_step, params, rest, split: Split, batch_size: int, mesh=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact batched evaluation: ``(rows, labels, probs, losses)``, one entry per image in
    the order of ``split.npy`` (``rows`` are the images' rows in it).

    The last batch is padded to the fixed batch shape and the padding dropped by its mask,
    so every image counts exactly once and the step never recompiles. With several
    processes each evaluates its own slice and the results are gathered on every host.
    """
    mesh = mesh or parallel.make_mesh()
    local = parallel.local_batch_size(batch_size, mesh)
    ds = eval_dataset(
        split.npy,
        split.labels,
        batch_size=local,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    rows, probs, losses, labels = [], [], [], []
    it = to_iterator(ds, workers=0)
    for batch in it:
        batch = parallel.shard_batch(batch, mesh)
        rows.append(parallel.to_host(batch["index"])[parallel.to_host(batch["mask"]) > 0])
        logits, loss = eval_step(params, rest, batch)
        keep = parallel.to_host(batch["mask"]) > 0
        probs.append(parallel.to_host(jax.nn.softmax(logits))[keep])
        losses.append(parallel.to_host(loss)[keep])
        labels.append(parallel.to_host(batch["label"])[keep])
    it.close()
    out = [np.concatenate(x) for x in (rows, labels, probs, losses)]
    # Several processes interleave their slices within each global batch: restore file order.
    order = np.argsort(out[0], kind="stable")
    return tuple(x[order] for x in out)
