"""Pack parsed sections into retrieval chunks that follow the document's structure."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ingestion.parse import Section

_SEPARATOR = "\n"
# End of a sentence: terminal punctuation, optional closing quotes/brackets, then whitespace.
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s)")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Chunk:
    """A piece of a document small enough to embed, with where it came from."""

    index: int
    text: str
    page: int | None
    section: str | None


@dataclass(frozen=True)
class _Part:
    """A piece of text placed in a chunk under construction."""

    text: str
    is_title: bool
    page: int | None
    heading: str | None


def chunk_sections(sections: list[Section], max_chars: int = 1000) -> list[Chunk]:
    """Chunk sections: titles open chunks, text packs up to max_chars, tables stand alone."""
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    builder = _ChunkBuilder(max_chars)
    for section in sections:
        text = section.text.strip()
        if not text:
            continue
        if section.kind == "title":
            builder.add_title(text, section)
        elif section.kind == "table":
            builder.add_table(text, section)
        else:
            builder.add_text(text, section)
    return builder.finish()


class _ChunkBuilder:
    """Accumulates parts into chunks no longer than max_chars."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.parts: list[_Part] = []
        self.chunks: list[Chunk] = []

    def add_title(self, text: str, section: Section) -> None:
        """Close any body text, then open the next chunk with the title as its first line."""
        if self._has_body() or not self._fits(text):
            self._flush()
        if len(text) > self.max_chars:
            self._add_long(text, section, is_title=True)
            return
        self._append(text, section, is_title=True)

    def add_text(self, text: str, section: Section) -> None:
        """Pack text after what is there; split it only when it cannot fit a chunk whole."""
        if self._fits(text):
            self._append(text, section)
            return
        if self._has_body():
            self._flush()
        self._add_long(text, section)

    def add_table(self, text: str, section: Section) -> None:
        """Give a table chunks of its own, split between rows when it is too long."""
        if self._has_body():
            self._flush()
        for row in text.splitlines():
            if row.strip():
                self.add_text(row.strip(), section)
        self._flush()

    def finish(self) -> list[Chunk]:
        """Close the last chunk and return all chunks in order."""
        self._flush()
        return self.chunks

    def _add_long(self, text: str, section: Section, *, is_title: bool = False) -> None:
        """Fill chunks with sentence-, then word-, then hard-split prefixes of the text."""
        rest = text
        while rest:
            if self._fits(rest):
                self._append(rest, section, is_title=is_title)
                return
            head, rest = _take_prefix(rest, self._room())
            if not head and not self.parts:
                head, rest = rest[: self.max_chars], rest[self.max_chars :].lstrip()
            if head:
                self._append(head, section, is_title=is_title)
            self._flush()

    def _append(self, text: str, section: Section, *, is_title: bool = False) -> None:
        """Add one part to the chunk under construction."""
        self.parts.append(_Part(text, is_title, section.page, section.heading))

    def _has_body(self) -> bool:
        """Tell whether the open chunk holds anything besides titles."""
        return any(not part.is_title for part in self.parts)

    def _room(self) -> int:
        """Return how many characters the open chunk can still take (separator included)."""
        if not self.parts:
            return self.max_chars
        used = sum(len(part.text) for part in self.parts) + len(_SEPARATOR) * len(self.parts)
        return self.max_chars - used

    def _fits(self, text: str) -> bool:
        """Tell whether text fits whole into the open chunk."""
        return len(text) <= self._room()

    def _flush(self) -> None:
        """Close the open chunk, if any, into the list of chunks."""
        if not self.parts:
            return
        text = _SEPARATOR.join(part.text for part in self.parts)
        pages = [part.page for part in self.parts if part.page is not None]
        self.chunks.append(
            Chunk(
                index=len(self.chunks),
                text=text,
                page=pages[0] if pages else None,
                section=_chunk_section(self.parts),
            )
        )
        self.parts = []


def _chunk_section(parts: list[_Part]) -> str | None:
    """Return the heading of the chunk's first body part, else of its last title."""
    for part in parts:
        if not part.is_title:
            return part.heading
    return parts[-1].heading if parts else None


def _take_prefix(text: str, budget: int) -> tuple[str, str]:
    """Split off the longest prefix within budget ending at a sentence, else a word, boundary."""
    if budget <= 0:
        return "", text
    window = text[: budget + 1]
    cut = 0
    for match in _SENTENCE_END.finditer(window):
        cut = match.end()
    if cut == 0:
        for match in _WHITESPACE.finditer(window):
            cut = match.start()
    head = text[:cut].rstrip()
    if not head:
        return "", text
    return head, text[cut:].lstrip()
