"""curation.storage against a real S3 API (moto's server): publish, list, ranges, temps, errors."""

from __future__ import annotations

import pytest

from reelforge.curation import storage


def test_url_or_path():
    assert storage.is_url("s3://b/k") and storage.is_url("gs://b") and not storage.is_url("/a/b")
    assert not storage.is_url("file:///a") and not storage.is_url("rel/path") and not storage.is_url(None)
    assert storage.join("s3://b/x/", "shards", "a.tar") == "s3://b/x/shards/a.tar"
    assert storage.normalize("S3://b/x/") == "s3://b/x"
    assert storage.redact("s3://AKIA:secret@b/k") == "s3://b/k"
    assert storage.staging_dir("s3://b/x/") == storage.staging_dir("s3://b/x")
    assert storage.staging_dir("s3://b/x") != storage.staging_dir("s3://b/y")


def test_publish_list_ranges_and_temps(s3, tmp_path):
    base = s3.bucket("storage-basic") + "/run"
    local = tmp_path / "a.bin"
    local.write_bytes(bytes(range(256)) * 40)
    storage.put_file(str(local), storage.join(base, "shards", "a.tar"))
    storage.write_bytes(storage.join(base, "index.json"), b"{}")
    assert storage.listdir(base) == ["index.json", "shards"]
    assert storage.size(storage.join(base, "shards", "a.tar")) == 10240
    assert storage.read_bytes(storage.join(base, "shards", "a.tar"), 256, 260) == bytes([0, 1, 2, 3])
    assert dict(storage.walk_files(base)) == {"index.json": 2, "shards/a.tar": 10240}
    # no temporary object survives a publish; a leftover one (a crashed publish) is cleared
    storage.write_bytes(storage.join(base, "shards", "b.tar.tmp-dead"), b"x")
    assert storage.remove_temps(base) == 1
    assert sorted(dict(storage.walk_files(base))) == ["index.json", "shards/a.tar"]
    storage.remove(base, recursive=True)
    assert storage.listdir(base) == [] and not storage.exists(storage.join(base, "index.json"))


def test_a_missing_bucket_is_one_sentence(s3):
    with pytest.raises(storage.StorageError, match=r"cannot write s3://no-such-bucket-here/x .*bucket"):
        storage.write_bytes("s3://no-such-bucket-here/x", b"1")
