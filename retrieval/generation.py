"""After retrieval: scan chunks, answer (model or extractive), check citations, run the output guard."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from core import metrics
from core.settings import Settings
from guard import controls
from guard.injection import get_scanner
from guard.normalise import without_hidden
from guard.output import OutputVerdict, check_output
from guard.schemas import KillMode
from retrieval import prompting
from retrieval.models import Generator, ModelError, get_generator
from retrieval.schemas import Citation, QueryResponse

logger = logging.getLogger(__name__)
WITHHELD_TEXT = "The answer was withheld by the output guard."


@dataclass
class Generation:
    """The response, its cited chunk numbers, the (possibly neutralised) chunks, and the trace for the audit."""

    response: QueryResponse
    cited: set[int]
    chunks: Sequence[Any]
    backend: str
    model_id: str | None = None
    withheld: bool = False
    verdicts: dict[str, Any] = field(default_factory=dict)


Extractive = Callable[[Sequence[Any]], tuple[QueryResponse, set[int]]]
Cite = Callable[[int, Any], Citation]


def scan_chunks(chunks: Sequence[Any], settings: Settings) -> tuple[list[Any], list[int]]:
    """Neutralise instruction-like segments in retrieved chunks' text (documents ingested before a rule change too)
    and titles (never scanned at ingestion: an uploader, a file or attachment name chose them)."""
    if not settings.scan_retrieved_text:
        return list(chunks), []
    kept, flagged = [], []
    for n, chunk in enumerate(chunks, start=1):
        neutralised = _neutralised_fields(chunk)
        if neutralised:
            flagged.append(n)
            chunk = dataclasses.replace(chunk, **neutralised)
        kept.append(chunk)
    if flagged:
        metrics.GUARD_HITS.labels(kind="retrieved_text").inc(len(flagged))
    return kept, flagged


@functools.lru_cache(maxsize=4096)
def _title_flagged(title: str) -> bool:
    """Whether the retrieved-text scanner flags a title as the prompt shows it (the same titles come back query after
    query: cached on the stored title, so showing it is paid once too)."""
    return get_scanner().scan(prompting.title_as_shown(title)).flagged


def _neutralised_fields(chunk: Any) -> dict[str, str]:
    """The chunk's title and text that need neutralising, neutralised (text this very scanner passed at ingestion
    is not scored again). The title is judged, and neutralised, as the prompt shows it: on one line."""
    scanner, fields = get_scanner(), {}
    if _title_flagged(chunk.title):
        fields["title"] = scanner.neutralise(prompting.title_as_shown(chunk.title))
    if getattr(chunk, "scanned_by", "") != scanner.version and scanner.scan(chunk.text).flagged:
        fields["text"] = scanner.neutralise(chunk.text)
    return fields


def respond(*, session: Session, settings: Settings, question: str, chunks: Sequence[Any], kill_mode: KillMode,
            departments: list[str], extractive: Extractive, cite: Cite) -> Generation:
    """The answer that may leave: generated when allowed and sound, else extractive; always output-guarded."""
    chunks, flagged = scan_chunks(chunks, settings)
    response, cited = extractive(chunks)
    generator = get_generator(settings) if kill_mode is KillMode.normal else None
    result = Generation(response=response, cited=cited, chunks=chunks,
                        backend="extractive" if generator is None else generator.name,
                        verdicts={"retrieved_text": {"neutralised": flagged}})
    if kill_mode is not KillMode.normal:
        result.verdicts["kill_switch"] = kill_mode.value
    if generator is not None and chunks and not response.refused:
        _generate(session, settings, question, chunks, departments, generator, cite, result)
    elif generator is not None:
        result.verdicts["model"] = {"called": False, "reason": "no_authorised_relevant_content"}
    if not result.response.refused and "output" not in result.verdicts:
        _guard_output(session, settings, chunks, departments, result)
    # What leaves carries no hidden text (tag characters, variation-selector runs): invisible to the person asking,
    # their text (a document's, a model's) is read by any model the client passes the answer to. Citations' titles
    # and snippets are `ShownText`; the answer, replaced after it was built, is stripped here.
    answer = without_hidden(prompting.qualify_placeholders(result.response.answer, [c.document_id for c in chunks]))
    result.response = result.response.model_copy(update={"answer": answer})
    return result


def _generate(session: Session, settings: Settings, question: str, chunks: Sequence[Any], departments: list[str],
              generator: Generator, cite: Cite, result: Generation) -> None:
    """Ask the model (a canary per searched department in its hidden context); keep only a sound answer."""
    canaries = {d: controls.ensure_canary(session=session, settings=settings, department=d) for d in departments}
    result.model_id = generator.model_id
    trace: dict[str, Any] = {"called": False, "chunks_given": []}
    result.verdicts["model"] = trace
    try:  # the prompt measured with the model's tokenizer, then the call: the backend may fail in either
        prompt = _prompt(settings, question, chunks, canaries, generator)
        trace.update(called=bool(prompt.given), chunks_given=sorted(prompt.given))
        if not prompt.given:
            trace["fallback"] = "over_budget"
            return
        text = generator.complete(prompt.messages, max_tokens=settings.llm_max_answer_tokens)
    except ModelError as exc:  # the backend's failure by its type only: its message may echo the prompt
        trace["fallback"] = f"model_error:{type(exc.__cause__ or exc).__name__}"
        metrics.ANSWER_FALLBACKS.labels(reason="model_error").inc()
        return
    # Every known canary, and always those this prompt carries (the cached set may predate one just minted).
    checked = {**controls.canaries(session=session, settings=settings), **canaries}
    verdict = check_output(text, canaries=checked, system_prompt=prompt.system,
                           context="\n".join(prompt.given.values()))
    if verdict.withheld:  # a model that leaks a canary is compromised: nothing of this request goes out
        _withhold(session, settings, departments, result, verdict)
        return
    reason = prompting.check_generated(verdict.text, prompt.given, set(range(1, len(chunks) + 1)))
    if reason is not None:
        trace["fallback"] = reason
        metrics.ANSWER_FALLBACKS.labels(reason=reason).inc()
        return
    cited = set(prompting.citations_in(verdict.text))
    result.response = result.response.model_copy(update={
        "answer": verdict.text.strip(), "citations": [cite(n, chunks[n - 1]) for n in sorted(cited)]})
    result.cited = cited
    result.verdicts["output"] = verdict.as_audit()


def _prompt(settings: Settings, question: str, chunks: Sequence[Any], canaries: dict[str, str],
            generator: Generator) -> prompting.Prompt:
    """As many chunks as the model's window holds once the answer and the chat template's markers have their room."""
    budget = settings.llm_context_tokens - settings.llm_max_answer_tokens - generator.template_tokens
    return prompting.build_prompt(
        question, [prompting.PromptChunk(n=i, title=c.title, text=c.text) for i, c in enumerate(chunks, start=1)],
        canaries, budget_tokens=budget, count_tokens=generator.count_tokens, control_tokens=generator.control_tokens)


def _guard_output(session: Session, settings: Settings, chunks: Sequence[Any], departments: list[str],
                  result: Generation) -> None:
    """Canary, system-prompt echo and PII checks on the answer that would leave."""
    verdict = check_output(result.response.answer, canaries=controls.canaries(session=session, settings=settings),
                           system_prompt=prompting.SYSTEM_PROMPT, context="\n".join(c.text for c in chunks))
    if verdict.withheld:
        _withhold(session, settings, departments, result, verdict)
        return
    result.verdicts["output"] = verdict.as_audit()
    if verdict.text != result.response.answer:
        result.response = result.response.model_copy(update={"answer": verdict.text})


def _withhold(session: Session, settings: Settings, departments: list[str], result: Generation,
              verdict: OutputVerdict) -> None:
    """Replace the answer with a notice, raise the alert and count the hit towards the automatic trip."""
    result.verdicts["output"] = verdict.as_audit()
    result.withheld = True
    metrics.OUTPUT_GUARD_WITHHELD.labels(reason=str(verdict.reason)).inc()
    logger.warning("output guard withheld an answer (reason=%s)", verdict.reason)
    tripped = controls.record_guard_hit(session=session, settings=settings, departments=departments,
                                        kind=f"output_{verdict.reason}")
    if tripped:
        result.verdicts["auto_trip"] = tripped
    result.response = result.response.model_copy(update={
        "answer": WITHHELD_TEXT, "citations": [], "refused": True, "reason": "output_withheld"})
    result.cited = set()
