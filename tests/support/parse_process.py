"""A worker process parsing one document, as a Celery prefork child does, for a test to kill mid-parse:
`python -m tests.support.parse_process FILE CONTENT_TYPE`."""

from __future__ import annotations

import sys
from pathlib import Path

from ingestion.parse import ParseLimits, parse_document

if __name__ == "__main__":
    parse_document(Path(sys.argv[1]).read_bytes(), sys.argv[2], ParseLimits(timeout_seconds=600))
