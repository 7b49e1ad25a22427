import pyarrow as pa

from reelforge.curation.schema import (
    ARROW_SCHEMA,
    COLUMNS,
    Media,
    Message,
    Sample,
    drop,
    empty_row,
    make_id,
    row_to_sample,
    sample_to_row,
)
from reelforge.jobs.spark import spark_schema


def test_spark_and_arrow_schemas_come_from_the_dataclasses():
    s = spark_schema()
    assert [f.name for f in s.fields] == list(COLUMNS)
    media = s["media"].dataType.elementType
    assert [f.name for f in media.fields] == [f for f in Media.__dataclass_fields__]
    assert s["messages"].dataType.elementType.fieldNames() == ["role", "content"]
    assert ARROW_SCHEMA.field("media").type.value_type.field("phash").type == pa.list_(pa.int64())
    assert s["tokens"].dataType.typeName() == "long"


def test_row_round_trip_through_arrow():
    smp = Sample(id="x", kind="conversation", source="s", source_key="k", source_location="/p",
                 messages=[Message("user", "<image>\nhi"), Message("assistant", "hello")],
                 media=[Media(kind="image", uri="/a.jpg", width=3, height=4)])
    row = sample_to_row(smp)
    back = pa.RecordBatch.from_pylist([row], schema=ARROW_SCHEMA).to_pylist()[0]
    assert row_to_sample(back) == smp


def test_ids_are_stable_and_depend_on_source_key_and_content():
    a = make_id("src", "f.jsonl:1", {"text": "hi"})
    assert a == make_id("src", "f.jsonl:1", {"text": "hi"})
    assert a != make_id("src", "f.jsonl:2", {"text": "hi"})
    assert a != make_id("src", "f.jsonl:1", {"text": "hi!"})
    assert a != make_id("other", "f.jsonl:1", {"text": "hi"})
    assert len(a) == 24


def test_first_drop_wins():
    row = empty_row()
    drop(row, "probe", "corrupt_image", "x")
    drop(row, "quality", "too_small", "y")
    assert (row["drop_step"], row["drop_reason"]) == ("probe", "corrupt_image")
