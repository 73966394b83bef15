"""The prediction journal and its CSV flushes (io/journal.py)."""

from __future__ import annotations

from napari_cellseg.io.annotations import read_annotations
from napari_cellseg.io.journal import (Journal, done_ids, flush_csv, journal_path, journal_replaces,
                                       read_journal)


def test_reopen_appends_after_close_and_ends_a_torn_line(tmp_path):
    path = tmp_path / ".sub.csv.rank0.journal"
    journal = Journal(path, "kaggle")
    journal.add("a", (4, 5), ["1 2"])
    journal.close()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"id": "torn')  # a kill mid-write
    journal.reopen()
    journal.add("b", (4, 5), [])
    journal.close()
    assert [e["id"] for e in read_journal(path)] == ["a", "b"]


def test_flush_keeps_the_train_format_and_extra_columns(tmp_path):
    out = tmp_path / "sub.csv"
    out.write_text("id,annotation,width,height,checked_by\nold,1 5,10,8,ana\nredo,1 2,5,4,ben\n")
    journal = Journal(journal_path(out, 0), "train")
    journal.add("redo", (4, 5), ["3 2"])  # predicted again: the journal's row wins
    journal.add("new", (6, 7), [])
    journal.close()
    assert flush_csv(out, "train", keep_existing=True) == 3
    assert out.read_text().splitlines() == ["id,annotation,width,height,checked_by", "old,1 5,10,8,ana",
                                            "redo,3 2,5,4,", "new,,7,6,"]
    assert read_annotations(out).shape("new") == (6, 7)


def test_a_replacing_runs_journal_is_not_resumed_from_the_older_csv(tmp_path):
    """Entries of a run that replaces --out say so: --resume then counts only the journal as
    done, and the older CSV's rows survive only for ids the run does not predict."""
    out = tmp_path / "sub.csv"
    out.write_text("id,predicted\na,1 7\nb,1 7\nother,3 4\n")
    journal = Journal(journal_path(out, 0), "kaggle", replaces=True)
    journal.add("a", (4, 5), ["1 2"])
    journal.close()
    assert journal_replaces(out) and done_ids(out, csv_rows=False) == {"a"}
    assert done_ids(out) == {"a", "b", "other"}
    flush_csv(out, "kaggle", keep_existing=True, drop_ids={"a", "b"})
    assert out.read_text() == "id,predicted\nother,3 4\na,1 2\n"
    assert not journal_replaces(out)
