"""Which storage errors are retried (transient ones, as s3fs and botocore raise them), how many
times, and that each retry is counted; the end-to-end check through a faulty proxy is
tests/storage/test_s3_run.py::test_transient_storage_errors_are_retried_and_counted."""

import errno

import pytest
from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

from dr_pipeline.core import storage
from dr_pipeline.core.storage import STORAGE_ATTEMPTS, RetryingReader, retrying, storage_retries

TRANSIENT = {
    "connection reset": ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "503 SlowDown (as s3fs raises it)": OSError(errno.EBUSY, "Please reduce your request rate."),
    "connection closed (botocore)": ConnectionClosedError(endpoint_url="http://127.0.0.1:1/b/k"),
    "read timeout (botocore)": ReadTimeoutError(endpoint_url="http://127.0.0.1:1/b/k"),
    "timeout": TimeoutError("timed out"),
}
PERMANENT = {
    "missing": FileNotFoundError(errno.ENOENT, "No such file"),
    "denied": PermissionError(errno.EACCES, "Access Denied"),
    "disk full": OSError(errno.ENOSPC, "No space left on device"),
    "read-only": OSError(errno.EROFS, "Read-only file system"),
}


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    monkeypatch.setattr(storage, "backoff", lambda attempt: None)


def _failing(errors, result="done"):
    """A call that raises each of `errors` in turn, then returns `result`; counts its calls."""
    pending = list(errors)
    calls = []

    def call():
        calls.append(1)
        if pending:
            raise pending.pop(0)
        return result

    return call, calls


@pytest.mark.parametrize("name", TRANSIENT)
def test_a_transient_error_is_retried_and_counted(name):
    call, calls = _failing([TRANSIENT[name], TRANSIENT[name]])
    before = storage_retries()
    assert retrying(call) == "done"
    assert len(calls) == 3 and storage_retries() - before == 2


@pytest.mark.parametrize("name", PERMANENT)
def test_a_permanent_error_is_raised_at_once(name):
    call, calls = _failing([PERMANENT[name]])
    before = storage_retries()
    with pytest.raises(type(PERMANENT[name])):
        retrying(call)
    assert len(calls) == 1 and storage_retries() == before


def test_retries_are_bounded():
    call, calls = _failing([ConnectionResetError()] * (STORAGE_ATTEMPTS + 5))
    with pytest.raises(ConnectionResetError):
        retrying(call)
    assert len(calls) == STORAGE_ATTEMPTS


class _DroppingFile:
    """A remote file whose connection drops once, `after` bytes into it."""

    def __init__(self, data: bytes, after: int | None):
        self.data, self.after, self.position = data, after, 0

    def read(self, size=-1):
        end = len(self.data) if size < 0 else self.position + size
        if self.after is not None and end > self.after:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        chunk = self.data[self.position:end]
        self.position += len(chunk)
        return chunk

    def seek(self, offset, whence=0):
        self.position = offset if whence == 0 else len(self.data) + offset
        return self.position


def test_a_read_cut_by_a_dropped_connection_resumes_where_it_was():
    data = bytes(range(256)) * 40
    opened = []

    def opener():
        opened.append(1)
        return _DroppingFile(data, after=5000 if len(opened) == 1 else None)

    reader = RetryingReader(opener)
    before = storage_retries()
    assert reader.read(4000) + reader.read(4000) + reader.read() == data
    assert len(opened) == 2 and storage_retries() - before == 1
