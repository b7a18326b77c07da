"""Output formats: one module each, one registry; everything that writes or reads a unit's data
file (the runner and `--extend`, the reader, validate, export, plan) finds its format here.

Adding a format is one module defining a `DatasetFormat` subclass and one `register_format`
of an instance. Names are those of job files (`output.format`); dataset.json records some
under an older name (`core.config.FORMAT_RECORDED_AS`), which `format_for` also takes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from dr_pipeline.core.config import FORMAT_RECORDED_AS, OutputConfig
from dr_pipeline.core.errors import ConfigError
from dr_pipeline.core.storage import FileInfo, Location
from dr_pipeline.dataset.formats.base import DatasetFormat, FileLayout, UnitWriter
from dr_pipeline.dataset.formats.ipc import IpcFormat
from dr_pipeline.dataset.formats.parquet import ParquetFormat
from dr_pipeline.dataset.formats.webdataset import WebDatasetFormat

FORMATS: dict[str, DatasetFormat] = {
    "parquet": ParquetFormat(),
    "webdataset": WebDatasetFormat(),
    "ipc": IpcFormat(),
}
_RECORDED = {recorded: name for name, recorded in FORMAT_RECORDED_AS.items()}


def register_format(output_format: DatasetFormat) -> None:
    """Make `output_format` known under its name (a name taken already is an error)."""
    if output_format.name in FORMATS or output_format.name in _RECORDED:
        raise ValueError(f"output format {output_format.name!r} is registered already")
    FORMATS[output_format.name] = output_format


def format_for(name: str) -> DatasetFormat:
    """The format of a job file's `output.format` or a dataset.json's `format`."""
    output_format = FORMATS.get(_RECORDED.get(name, name))
    if output_format is None:
        raise ConfigError(f"output.format: unknown format {name!r} (known: {', '.join(FORMATS)})")
    return output_format


@contextlib.contextmanager
def open_unit_writer(
    out: Location, relative_path: str, layout: FileLayout, output: OutputConfig
) -> Iterator[tuple[UnitWriter, list[FileInfo]]]:
    """A writer of one unit's file (data or sidecar: `layout`) in the output's format, streamed into
    a temporary file renamed into place only when the whole unit is written; after the block, the
    list holds the committed file's info."""
    committed: list[FileInfo] = []
    with out.open_atomic(relative_path) as sink:
        writer = format_for(output.format).open_writer(sink, layout, output.keep_images)
        try:
            yield writer, committed
        except BaseException:  # the unit failed or was cancelled: the temp file is removed next
            with contextlib.suppress(Exception):
                writer.close()  # now, or the writer's finaliser writes to the removed file later
            raise
        writer.close()
    committed.append(sink.info)
