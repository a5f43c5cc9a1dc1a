"""Partitioners for the formats beyond text, HTML, PDF and DOCX (issue 3), all offline; ODT, RTF and EPUB are
converted to DOCX or HTML first (ingestion/pandoc.py).

E-mail attachments become child documents of the e-mail (ingestion/service.py, `spawn_attachments`).
"""

from __future__ import annotations

import email
import email.policy
import io
import logging
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import TYPE_CHECKING

from core.errors import ErrorCode, GovragError
from ingestion import sniff

if TYPE_CHECKING:
    from unstructured.documents.elements import Element

logger = logging.getLogger(__name__)

_LANGUAGES = ["eng"]
_ENCRYPTED_MAIL = ("application/pkcs7-mime", "application/x-pkcs7-mime", "multipart/encrypted")

# How a parser's failure names the upload: as sent, also where it was converted first (ODT, .doc: ingestion/parse.py).
NAMES = {
    sniff.MESSAGE_RFC822: "e-mail", sniff.APPLICATION_MSG: "Outlook message", sniff.APPLICATION_PPTX: "PPTX",
    sniff.APPLICATION_XLSX: "XLSX", sniff.APPLICATION_XLS: "XLS", sniff.APPLICATION_ODT: "ODT",
    sniff.APPLICATION_EPUB: "EPUB", sniff.APPLICATION_RTF: "RTF", sniff.APPLICATION_XML: "XML",
    sniff.TEXT_CSV: "CSV", sniff.TEXT_TSV: "TSV", sniff.APPLICATION_DOC: "DOC", sniff.APPLICATION_PPT: "PPT",
}


def partition_eml(data: bytes) -> list[Element]:
    """Headers, body and attachments of a MIME message; S/MIME or PGP-encrypted mail is refused clearly."""
    from unstructured.partition.email import partition_email

    data = _as_utf8_mail(data)
    _refuse_encrypted_mail(data)
    # Attachments become child documents, sniffed and limited like any upload (service.spawn_attachments).
    return _with_headers(_mail_headers(data), partition_email(file=io.BytesIO(data), process_attachments=False,
                                                              languages=_LANGUAGES))


def partition_outlook(data: bytes) -> list[Element]:
    """An Outlook .msg with its attachments."""
    from unstructured.partition.msg import partition_msg

    return partition_msg(file=io.BytesIO(data), process_attachments=False, languages=_LANGUAGES)


MAX_ATTACHMENTS = 20
MAIL_TYPES = frozenset({sniff.MESSAGE_RFC822, sniff.APPLICATION_MSG})


def attachments(data: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """The (file name, bytes) of an e-mail's attachments, in order; an attached e-mail comes whole (its own
    attachments are its own). Empty bytes mean an attachment that could not be read. Other types have none."""
    if content_type == sniff.MESSAGE_RFC822:
        message = email.message_from_bytes(_as_utf8_mail(data), policy=email.policy.default)
        return [(_attachment_name(part), _attachment_bytes(part)) for part in _attached_parts(message)]
    if content_type == sniff.APPLICATION_MSG:
        from oxmsg import Message

        return [(item.file_name or "attachment", item.file_bytes or b"")
                for item in Message.load(io.BytesIO(data)).attachments]
    return []


def _attached_parts(part: EmailMessage) -> Iterator[EmailMessage]:
    """Attachment parts and attached messages, without descending into an attached message."""
    for child in part.iter_parts():
        if child.get_content_disposition() == "attachment" or child.get_content_type() == sniff.MESSAGE_RFC822:
            yield child
        elif child.is_multipart():
            yield from _attached_parts(child)


def _attachment_name(part: EmailMessage) -> str:
    name = part.get_filename()
    if name:
        return name
    return "attached message.eml" if part.get_content_type() == sniff.MESSAGE_RFC822 else "attachment"


def _attachment_bytes(part: EmailMessage) -> bytes:
    if part.get_content_type() == sniff.MESSAGE_RFC822:
        inner = part.get_content()
        return inner.as_bytes() if isinstance(inner, EmailMessage) else b""
    return part.get_payload(decode=True) or b""


def partition_pptx(data: bytes) -> list[Element]:
    """Slides, each slide's text and tables; notes included."""
    from unstructured.partition.pptx import partition_pptx as partition

    return partition(file=io.BytesIO(data), include_slide_notes=True, languages=_LANGUAGES)


def partition_spreadsheet(data: bytes) -> list[Element]:
    """Each sheet as a table (XLSX, and XLS through xlrd)."""
    from unstructured.partition.xlsx import partition_xlsx

    return partition_xlsx(file=io.BytesIO(data), include_header=True, languages=_LANGUAGES)


def partition_delimited(delimiter: str) -> Callable[[bytes], list[Element]]:
    """CSV or TSV as one table."""

    def partition(data: bytes) -> list[Element]:
        if delimiter == "\t":
            from unstructured.partition.tsv import partition_tsv

            return partition_tsv(file=io.BytesIO(data), include_header=True, languages=_LANGUAGES)
        from unstructured.partition.csv import partition_csv

        return partition_csv(file=io.BytesIO(data), encoding=sniff.text_encoding(data), include_header=True,
                             languages=_LANGUAGES)

    return partition


def partition_xml(data: bytes) -> list[Element]:
    """XML text content, without tags; entities are not resolved (no XXE)."""
    from unstructured.partition.xml import partition_xml as partition

    return partition(file=io.BytesIO(data), encoding=sniff.text_encoding(data), xml_keep_tags=False,
                     languages=_LANGUAGES)


def _as_utf8_mail(data: bytes) -> bytes:
    """A message saved as UTF-16 (BOM first) re-encoded as UTF-8, which the MIME parser expects."""
    encoding = sniff.text_encoding(data)
    return data.decode(encoding).encode("utf-8") if encoding != "utf-8" else data


def _refuse_encrypted_mail(data: bytes) -> None:
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    content_type = (message.get_content_type() or "").lower()
    if content_type in _ENCRYPTED_MAIL or "smime" in str(message.get("Content-Type", "")).lower():
        raise GovragError(ErrorCode.invalid_request, "the e-mail is encrypted (S/MIME or PGP): it cannot be read")


def _mail_headers(data: bytes) -> str:
    """A 'From / To / Cc / Subject / Date' block, so who wrote to whom is searchable (and redacted)."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    lines = []
    for name in ("From", "To", "Cc", "Subject", "Date"):
        try:
            value = message.get(name)
        except (ValueError, IndexError):  # malformed header: skip it, keep the mail
            value = None
        if value:
            lines.append(f"{name}: {value}")
    return "\n".join(lines)


def _with_headers(headers: str, elements: list[Element]) -> list[Element]:
    if not headers:
        return elements
    from unstructured.documents.elements import Text

    return [Text(text=headers), *elements]


PARTITIONERS: dict[str, Callable[[bytes], list[Element]]] = {
    sniff.MESSAGE_RFC822: partition_eml,
    sniff.APPLICATION_MSG: partition_outlook,
    sniff.APPLICATION_PPTX: partition_pptx,
    sniff.APPLICATION_XLSX: partition_spreadsheet,
    sniff.APPLICATION_XLS: partition_spreadsheet,
    sniff.TEXT_CSV: partition_delimited(","),
    sniff.TEXT_TSV: partition_delimited("\t"),
    sniff.APPLICATION_XML: partition_xml,
}
