"""Documents that keep a converter or an OCR tool busy: a long ODT for pandoc, a scan with no text layer."""

from __future__ import annotations

import io
import random
import re
import zipfile
from pathlib import Path

import pikepdf

FOLDER = Path(__file__).resolve().parents[3] / "shared" / "eval" / "enterprise_docs_ingestion"
ODT = FOLDER / "unstructured_example_docs" / "fake.odt"


def long_odt(paragraphs: int = 300_000) -> bytes:
    """fake.odt with its text replaced by many short paragraphs of digits (5 MB zipped, under the bomb ratio):
    minutes of pandoc's time and a heap past 600 MB."""
    seed = zipfile.ZipFile(ODT)
    head, tail = re.split(rb"<office:text>.*</office:text>", seed.read("content.xml"), flags=re.DOTALL)
    rng = random.Random(7)
    body = b"".join(b"<text:p>%d %d budget line %d.</text:p>" % (rng.getrandbits(40), rng.getrandbits(40), i)
                    for i in range(paragraphs))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as odt:
        for info in seed.infolist():
            content = head + b"<office:text>" + body + b"</office:text>" + tail if info.filename == "content.xml" \
                else seed.read(info.filename)
            odt.writestr(info, content, zipfile.ZIP_STORED if info.filename == "mimetype" else zipfile.ZIP_DEFLATED)
    return out.getvalue()


def drawing_only_pdf(pages: int = 1) -> bytes:
    """A PDF whose pages hold vector strokes and no text layer (like a scan)."""
    pdf = pikepdf.new()
    for _ in range(pages):
        content = pikepdf.Stream(pdf, b"0 0 m 300 300 l S 10 10 200 100 re f")
        page = pikepdf.Dictionary(Type=pikepdf.Name.Page, MediaBox=[0, 0, 612, 792],
                                  Contents=pdf.make_indirect(content))
        pdf.pages.append(pikepdf.Page(page))
    buffer = io.BytesIO()
    pdf.save(buffer)
    return buffer.getvalue()
