"""`Outdated`: the documents `govrag reindex` queues and those it leaves to their run, from one set of facts."""

from __future__ import annotations

from ingestion.reindex import Outdated


def test_pending_is_the_outdated_documents_being_ingested_so_queued_and_pending_never_disagree() -> None:
    """`pending` was stored beside the sets it came from, so it could name a document that is not outdated, or
    miss one that `to_queue` left out: the summary then counted a document neither queued nor pending. It is derived
    now: of the outdated documents, those being ingested are pending, the others queued, and none is both."""
    found = Outdated(unbound=frozenset({"a", "b"}), stale_scan=frozenset({"b", "c"}),
                     being_ingested=frozenset({"c", "not-outdated"}))

    assert found.pending == {"c"} and found.to_queue() == ["a", "b"]
    assert set(found.to_queue()) | found.pending == found.unbound | found.stale_scan
