"""The class-data-sharing archive of Spark's driver JVM: leftover recordings do not pile up."""

from __future__ import annotations

import os
import re

from reelforge.jobs.spark import _class_data_sharing


def test_recordings_that_lost_the_race_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("REELFORGE_CACHE", str(tmp_path))
    monkeypatch.delenv("REELFORGE_SPARK_CDS", raising=False)
    opt = _class_data_sharing()
    archive = re.search(r"-XX:ArchiveClassesAtExit=(\S+)\.tmp-\d+", opt).group(1)  # nothing yet: record
    old = os.path.getmtime(tmp_path) - 120  # settled: written more than 30 s ago
    for pid, size in ((99999990, 3 << 20), (99999991, 3 << 20), (99999992, 10)):  # above pid_max: dead
        with open(f"{archive}.tmp-{pid}", "wb") as f:  # two full recordings, one empty
            f.truncate(size)
        os.utime(f"{archive}.tmp-{pid}", (old, old))
    assert f"-XX:SharedArchiveFile={archive}" in _class_data_sharing()  # one recording became the archive
    assert os.path.getsize(archive) == 3 << 20
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(archive)]  # the rest removed (each ~200 MB)
    # a recording whose JVM still runs is left alone, and the archive is used meanwhile
    live = f"{archive}.tmp-{os.getpid()}"
    open(live, "wb").close()
    assert f"-XX:SharedArchiveFile={archive}" in _class_data_sharing() and os.path.exists(live)
