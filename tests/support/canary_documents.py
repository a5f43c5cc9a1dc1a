"""One document of each format govrag parses, each holding a line of text that shows where its plaintext went: a
canary made here where the format can be written here, else a line of an example file its parse is known to give."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import docx
import openpyxl
import pikepdf
import pptx
import pypandoc
from PIL import Image, ImageDraw, ImageFont

from tests.support.conversion_inputs import FOLDER

CANARY = "Zebracanary Quillfeather"
EXAMPLES = FOLDER / "unstructured_example_docs"
# Formats written by programs of their own (LibreOffice, Outlook, Excel 97): example files, and a line of each
EXAMPLE_LINES = {
    "fake.doc": "Lorem ipsum dolor sit amet.",
    "fake-power-point.ppt": "Adding a Bullet Slide",
    "fake-email.msg": "This is a test email to use for unit tests.",
    "tests-example.xls": "Question Format Abbreviations",
}
_SENTENCE = f"The canary paragraph says {CANARY} in a sentence long enough to be narrative text."


def write_all(folder: Path, *, legacy: bool, scan: bool) -> dict[str, str]:
    """Write the documents into `folder` (the .doc/.ppt only with `legacy`, the scan only with `scan`); the line
    each one's parse gives, by file name."""
    lines = {}
    for name, data in _canary_documents(scan).items():
        (folder / name).write_bytes(data)
        lines[name] = CANARY
    for name, line in EXAMPLE_LINES.items():
        if legacy or not name.endswith((".doc", ".ppt")):
            (folder / name).write_bytes((EXAMPLES / name).read_bytes())
            lines[name] = line
    return lines


def _canary_documents(scan: bool) -> dict[str, bytes]:
    """Each format govrag reads that is written here, by file name."""
    documents = {
        "canary.txt": f"{_SENTENCE}\n".encode(),
        "canary.md": f"# Title\n\n{_SENTENCE}\n".encode(),
        "canary.html": f"<html><body><h1>Title</h1><p>{_SENTENCE}</p></body></html>".encode(),
        "canary.xml": f"<?xml version='1.0'?><root><item>{_SENTENCE}</item></root>".encode(),
        "canary.csv": f"name,value\n{CANARY},1\nother,2\n".encode(),
        "canary.tsv": f"name\tvalue\n{CANARY}\t1\nother\t2\n".encode(),
        "canary.eml": ("From: a@example.com\nTo: b@example.com\nSubject: hello\n"
                       f"Content-Type: text/plain\n\n{_SENTENCE}\n").encode(),
        **_office_documents(),
        "canary.pdf": _text_pdf(),
        **{f"canary.{kind}": _by_pandoc(kind) for kind in ("odt", "rtf", "epub")},
    }
    if scan:
        documents["canary-scan.pdf"] = _scan_pdf()
    return documents


def _office_documents() -> dict[str, bytes]:
    """The canary as a DOCX (python-docx), a PPTX (python-pptx) and an XLSX (openpyxl), by file name."""
    word = docx.Document()
    word.add_heading("Title")
    word.add_paragraph(_SENTENCE)
    slides = pptx.Presentation()
    slide = slides.slides.add_slide(slides.slide_layouts[1])
    slide.shapes.title.text = "Title"
    slide.placeholders[1].text = _SENTENCE
    sheets = openpyxl.Workbook()
    sheets.active.append(["name", "value"])
    sheets.active.append([CANARY, 1])
    saved = {}
    for name, document in (("canary.docx", word), ("canary.pptx", slides), ("canary.xlsx", sheets)):
        buffer = io.BytesIO()
        document.save(buffer)
        saved[name] = buffer.getvalue()
    return saved


def _text_pdf() -> bytes:
    """A page with the sentence in its text layer (Helvetica, no embedded font)."""
    pdf = pikepdf.new()
    font = pikepdf.Dictionary(Type=pikepdf.Name.Font, Subtype=pikepdf.Name.Type1, BaseFont=pikepdf.Name.Helvetica)
    content = pikepdf.Stream(pdf, f"BT /F1 12 Tf 72 700 Td ({_SENTENCE}) Tj ET".encode())
    page = pikepdf.Dictionary(Type=pikepdf.Name.Page, MediaBox=[0, 0, 612, 792], Contents=pdf.make_indirect(content),
                              Resources=pikepdf.Dictionary(Font=pikepdf.Dictionary(F1=font)))
    pdf.pages.append(pikepdf.Page(page))
    buffer = io.BytesIO()
    pdf.save(buffer)
    return buffer.getvalue()


def _scan_pdf() -> bytes:
    """A page that is only a picture of the canary, in large type: read by OCR."""
    image = Image.new("L", (1700, 400), 255)
    ImageDraw.Draw(image).text((50, 150), CANARY, fill=0, font=ImageFont.load_default(size=72))
    buffer = io.BytesIO()
    image.save(buffer, "PDF", resolution=200)
    return buffer.getvalue()


def _by_pandoc(kind: str) -> bytes:
    """The sentence as an ODT, RTF or EPUB, written by the pandoc pypandoc-binary ships."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder, f"canary.{kind}")
        pypandoc.convert_text(f"# Title\n\n{_SENTENCE}\n", kind, format="md", outputfile=str(output),
                              extra_args=["--standalone"])
        return output.read_bytes()
