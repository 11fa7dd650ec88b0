"""moto's S3 server for the bench, less one cost that S3 does not have.

moto answers each ListObjectVersions by deep-copying every version of every key in the bucket,
bytes included (moto/s3/models.py, `list_object_versions`: `copy.deepcopy(version_key)`, and
FakeKey's `__getstate__`/`__setstate__` read the whole value and write it into a new spooled
temporary file). A listing then costs time in proportion to the bytes the bucket holds: 4.3 s
for a bucket holding one 512 MiB files backup, measured on this machine (bench/RESULTS.md,
issue 24), where S3 answers a page in about 0.1-0.3 s whatever the objects' sizes. Every
restore from the bucket lists the backup's versions first (the retrieval gate), so that copy
landed in our restore's wall time and in no other contender's.

Here a listing's copy of a key shares nothing and copies no bytes: a FakeKey whose value buffer
is a new, empty one (the listing reads names, sizes, ETags, dates and storage classes only, and
the ETag is computed on the original first). Nothing else in moto changes. Used by
bench.common.MotoProcess; the tests run moto as it is.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from typing import Any

from moto.s3.models import FakeKey
from moto.server import main


def _listing_copy(self: FakeKey, memo: dict[int, Any]) -> FakeKey:
    self.etag  # noqa: B018 - computed from the bytes and kept on the original, so the copy has it
    copied = object.__new__(type(self))
    copied.__dict__.update(
        self.__dict__,
        _value_buffer=tempfile.SpooledTemporaryFile(self._max_buffer_size),  # its own: disposing it closes only that
        lock=threading.Lock(),
    )
    memo[id(self)] = copied
    return copied


FakeKey.__deepcopy__ = _listing_copy  # type: ignore[attr-defined]

if __name__ == "__main__":
    sys.exit(main())
