"""The bundled samples as one img2dataset-like parquet file, for the tests of parquet input."""

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from dr_pipeline.tools.sample_data import sample_records


def write_sample_parquet(dest_file: str) -> str:
    """Write the samples as one parquet file laid out like img2dataset's (key, caption, url, jpg)."""
    records = sample_records()
    table = pa.table(
        {
            "key": [r.key for r in records],
            "caption": [r.caption for r in records],
            "url": [r.url for r in records],
            "jpg": pa.array([r.image for r in records], type=pa.binary()),
        }
    )
    with fsspec.open(dest_file, "wb") as file:
        pq.write_table(table, file)
    return dest_file
