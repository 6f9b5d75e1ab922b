"""Why an object or a record was refused: the named reasons every reader, the ingest and the FID reader share.

Bad input never crashes an ingest and is never silently dropped: each refusal is a `Rejected` with one of these
reasons, counted by name in the ingest report (`quarantine_reasons`), listed in `slices/<id>/quarantine.json` and
the catalog's `quarantine` table. The README's quarantine table lists exactly these (a test checks it). A new
reason is one member here, with its docstring, and one row there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    INVALID_UTF8 = "invalid_utf8"
    """A `.txt`, a jsonl line or a caption that is not UTF-8."""
    INVALID_UNICODE = "invalid_unicode"
    """A jsonl `text` or a COCO caption holding a lone surrogate escape (`"\\ud800"`)."""
    INVALID_NAME = "invalid_name"
    """A file whose name is not UTF-8 (named with its bytes escaped; counted on every ingest, never read)."""
    MALFORMED_JSON = "malformed_json"
    """A jsonl line that is not JSON (or nested too deeply), a COCO captions file that is not one, or a COCO image
    entry without a string `file_name`."""
    MISSING_TEXT = "missing_text"
    """A jsonl row without a string `text`, a parquet file without a `text` column or with a null."""
    EMPTY = "empty"
    """Nothing left after normalisation."""
    LOW_QUALITY = "low_quality"
    """Failed a quality rule (the rule is in the record's detail and in the report's `low_quality_rules`)."""
    UNSUPPORTED_TYPE = "unsupported_type"
    """A file of a kind the platform does not read."""
    HIDDEN_FILE = "hidden_file"
    """A dot-file (`.DS_Store`, editor swap files)."""
    SKIPPED_LINK = "skipped_link"
    """A symbolic link (never followed: it may point outside the source)."""
    CORRUPT_ARCHIVE = "corrupt_archive"
    """A truncated or corrupt `.gz` or `.parquet`."""
    CORRUPT_IMAGE = "corrupt_image"
    """An image that does not decode."""
    IMAGE_TOO_LARGE = "image_too_large"
    """An image declaring more than `ingest.image_max_pixels` (decompression bombs)."""
    MISSING_IMAGE = "missing_image"
    """A COCO annotation whose image file is absent."""
    MISSING_CAPTION = "missing_caption"
    """An image without a caption."""
    TOO_LARGE = "too_large"
    """A document over `ingest.max_document_bytes`."""
    UNREADABLE = "unreadable"
    """The store could not read the object."""


@dataclass
class Rejected:
    """One refused object (`record` None) or record of an object (line, row or COCO image id)."""

    key: str
    record: int | None
    reason: Reason
    detail: str = ""
