"""Review items taken from slices of a batch (the batcher's engine batches are slices of the
requests): the items' logits and embeddings must be the escalated rows' own. pyarrow 26's take of
a sliced list of fixed-size lists ignores the slice's offset in the nested child (wrong rows, and
reads past the buffers: the server segfaulted on requests larger than max_batch_rows)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hitl_triage.serve.queue.items import review_items

M, C, D = 5, 10, 16


def batch(n: int, rng: np.random.Generator) -> tuple[pa.RecordBatch, pa.RecordBatch, np.ndarray, np.ndarray]:
    logits = rng.standard_normal((n, M, C)).astype(np.float32)
    embedding = rng.standard_normal((n, D)).astype(np.float32)
    ids = pa.array([f"p-{i}" for i in range(n)])
    predictions = pa.record_batch({
        "id": ids,
        "logits": pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel()), C), M),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embedding.ravel()), D),
    })
    escalate = rng.random(n) < 0.3
    decisions = pa.record_batch({
        "id": ids, "escalate": pa.array(escalate), "tier": pa.array(np.where(escalate, "general", None)),
        "reason_mask": pa.array(escalate.astype(np.uint8)), "priority": pa.array(rng.random(n).astype(np.float32)),
        "predicted_class": pa.array(rng.integers(0, C, n).astype(np.int32)),
    })
    return decisions, predictions, logits, embedding


@pytest.mark.parametrize("offset,length", [(0, 1000), (1024, 1024), (2047, 1), (3001, 999)])
def test_items_of_a_slice_carry_their_own_rows_logits_and_embedding(offset, length):
    rng = np.random.default_rng(offset + length)
    decisions, predictions, logits, embedding = batch(4000, rng)
    items = review_items(decisions.slice(offset, length), predictions.slice(offset, length), keep_embedding=True)
    rows = offset + np.flatnonzero(decisions.column("escalate").to_numpy(zero_copy_only=False)[offset:offset + length])
    assert items.column("id").to_pylist() == [f"p-{i}" for i in rows]
    got_logits = np.asarray(items.column("logits").combine_chunks().flatten().flatten()).reshape(-1, M, C)
    np.testing.assert_array_equal(got_logits, logits[rows])
    got_embedding = np.asarray(items.column("embedding").combine_chunks().flatten()).reshape(-1, D)
    np.testing.assert_array_equal(got_embedding, embedding[rows])
