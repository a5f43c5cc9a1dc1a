"""The libraries govrag runs told, before they are imported, to send nothing home, keep no device state and write
their temporary files where govrag keeps its own."""

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
# unstructured's "global working directory": where the environment turns it on, importing unstructured makes
# ~/.cache/unstructured/tmp/<process group> tempfile's default (again as it reads the setting), so a parse's temporary
# files, the document's plaintext, went there and not into the worker's private directory (`ingestion.scratch`),
# which the next worker removes after a killed one; and one such directory was left per process group
NO_WORKING_DIRECTORY = (("GLOBAL_WORKING_DIR_ENABLED", "false"),)


def configure_libraries() -> None:
    """Turn the libraries' telemetry and unstructured's working directory off in this process and those it starts
    (call before importing them)."""
    for name, value in NO_TELEMETRY + NO_WORKING_DIRECTORY:
        if os.environ.get(name) != value:  # already so from the start or the image: no setenv as other threads run
            os.environ[name] = value
