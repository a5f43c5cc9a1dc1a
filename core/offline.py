"""The libraries govrag runs told, before they are imported, to send nothing home and keep no device state."""

from __future__ import annotations

import os

# Each library reads its variable once, as it is imported (onnxruntime: as its shared library loads).
NO_TELEMETRY = (
    ("DO_NOT_TRACK", "1"),  # unstructured pings home on import and on every call
    ("UNSTRUCTURED_DISABLE_NOTICE", "1"),
    # onnxruntime's 1DS telemetry (its Privacy.md, "Disabling Telemetry"): else a device id and an event database in
    # ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ and a `.ses` session file in TMPDIR, the uploader started
    ("ORT_DISABLE_TELEMETRY", "1"),
)


def no_telemetry() -> None:
    """Turn the libraries' telemetry off in this process and those it starts (call before importing them)."""
    for name, value in NO_TELEMETRY:
        if os.environ.get(name) != value:  # already so from the start or the image: no setenv as other threads run
            os.environ[name] = value
