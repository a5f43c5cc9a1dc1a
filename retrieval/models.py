"""Answer backends: `extractive` (no model), `llamacpp` (in-process GGUF) and `openai` (a server on the allowlist)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from core import forksafe
from core.errors import ErrorCode, GovragError, StartRefused, UnusablePath
from core.http import ThreadSessions
from core.settings import Settings
from retrieval import gguf_file
from retrieval.prompting import looks_like_marker

logger = logging.getLogger(__name__)
CHARS_PER_TOKEN = 3.0  # conservative estimate where the tokenizer is remote
MAX_REPLY_BYTES = 1024 * 1024  # a chat completion is a few kilobytes; more is a broken or hostile server


class Generator(Protocol):
    """A chat model: messages in, text out."""

    name: str
    model_id: str
    template_tokens: int  # what the chat template adds around the messages' text, counted once: the prompt's budget
    control_tokens: frozenset[str]  # the model's control tokens as text: kept out of the prompt's untrusted text

    def complete(self, messages: list[dict[str, str]], *, max_tokens: int) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def close(self) -> None: ...


class ModelError(Exception):
    """The model call failed (the caller falls back to the extractive answer)."""


class ModelClosed(ModelError):
    """A call to a backend its last holder closed (`GeneratorHold.release`: the API stopping): a model failure like
    any other, the extractive answer given in its place."""


class _Calls:
    """The calls in flight on a backend, and its close: `closing` waits for those in flight to end, and a call that
    comes after it is ModelClosed, never a call into what is being freed."""

    def __init__(self) -> None:
        self._changed = forksafe.renewed(threading.Condition())
        self._in_flight = 0
        self._closed = False

    @contextmanager
    def call(self) -> Iterator[None]:
        """One call, counted while it runs; ModelClosed once the backend is closing or closed."""
        with self._changed:
            if self._closed:
                raise ModelClosed("the answer model was closed")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self._in_flight -= 1
                self._changed.notify_all()

    def closing(self) -> bool:
        """Refuse calls from now on and wait for those in flight to end; whether this was the first close (the one to
        free what the backend holds)."""
        with self._changed:
            first, self._closed = not self._closed, True
            self._changed.wait_for(lambda: self._in_flight == 0)
        return first


# What llama-cpp-python 0.3 raises as a completion fails (besides jinja2.TemplateError: a chat template that fails on
# these messages): a prompt that fills the context window, a template's raise_exception (a model that refuses a system
# message), numpy's refusal where llama.cpp rounded the window up past the buffers sized by n_ctx (ValueError);
# llama_decode's failures, no room in the KV cache, a failed allocation or computation, and the tokenizer's
# (RuntimeError); memory for its buffers (MemoryError). A TypeError, KeyError, ... is a bug and stays one.
LLAMA_COMPLETION_ERRORS: tuple[type[Exception], ...] = (ValueError, RuntimeError, MemoryError)
# The messages govrag sends, with no text: what the chat template makes of them is its own markers alone.
EMPTY_CHAT = [{"role": "system", "content": ""}, {"role": "user", "content": ""}]


class LlamaCppGenerator:
    """An in-process GGUF model through llama-cpp-python (the `llm` extra)."""

    name = "llamacpp"

    def __init__(self, model_path: Path, context_tokens: int) -> None:
        """The model loaded, and its chat template's tokens counted; a file this user may not read, one that is no
        whole GGUF (`gguf_file.check_whole`, before llama.cpp maps it), or one llama.cpp does not load or answer with,
        is UnusablePath (a path to fix, said in one line), llama-cpp-python missing a StartRefused naming the extra."""
        try:  # the system's reason, naming the file (llama.cpp says only that it failed)
            gguf_file.check_whole(model_path)
        except OSError as error:
            raise UnusablePath.refused(f"the answer model {model_path}", error, "GOVRAG_LLM_MODEL_PATH",
                                       fix="let this user read it", instead="a GGUF file this user may read") from None
        except gguf_file.NotWholeGGUF as error:
            raise UnusablePath(f"cannot use the answer model {model_path}: {error} (copy it whole again, or point "
                               "GOVRAG_LLM_MODEL_PATH at a whole GGUF file)") from None
        try:
            from jinja2 import TemplateError  # llama-cpp-python's chat templates: installed with it
            from llama_cpp import Llama  # optional dependency: govrag[llm]
        except ImportError as error:
            raise StartRefused(f"GOVRAG_ANSWER_BACKEND=llamacpp needs llama-cpp-python ({type(error).__name__}): "
                               "install govrag[llm], or choose another GOVRAG_ANSWER_BACKEND") from error
        self._errors = (*LLAMA_COMPLETION_ERRORS, TemplateError)
        self._lock = threading.Lock()
        self._calls = _Calls()
        self.model_id = model_path.name
        try:  # a GGUF it refuses; no memory for the context; a template that refuses govrag's messages
            self._llm = Llama(model_path=str(model_path), n_ctx=context_tokens, n_threads=2, seed=0, verbose=False)
            self.template_tokens = self._prompt_tokens(EMPTY_CHAT)
            self.control_tokens = self._control_tokens()
        except self._errors as error:
            raise UnusablePath(f"llama.cpp does not load the answer model {model_path} with "
                               f"GOVRAG_LLM_CONTEXT_TOKENS={context_tokens} ({type(error).__name__}): point "
                               "GOVRAG_LLM_MODEL_PATH at a GGUF file it loads, or set another context") from error

    def _prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """The tokens of the prompt `messages` make, chat template included, as llama.cpp counts them (one token
        generated: llama-cpp-python reads 0 as no limit)."""
        result = self._llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
        return int(result["usage"]["prompt_tokens"])  # type: ignore[index]

    def _control_tokens(self) -> frozenset[str]:
        """The text of every control token in the model's vocabulary (`<|im_end|>`, SmolLM2's `<filename>`) and of every
        user-defined one spelt like a template's or a reasoning model's marker (`<tool_call>`, `[TOOL_CALLS]`, Qwen3's
        `<think>`: `prompting.looks_like_marker`): the chat template's prompt is tokenized with special tokens parsed,
        and user-defined tokens are parsed in any text, so each would be one in a chunk's text."""
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        found = set()
        for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
            attributes = llama_cpp.llama_vocab_get_attr(vocab, token)
            if attributes & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED):
                text = llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", "replace")
                if attributes & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL or looks_like_marker(text):
                    found.add(text)
        return frozenset(found)

    @contextmanager
    def _calling(self) -> Iterator[None]:
        """One call into llama.cpp at a time, none once the model is closed (ModelClosed); what it raises as it fails
        is a ModelError of its type alone (a message may quote the prompt: the tokenizer's quotes the text), so the
        caller falls back to the extractive answer."""
        with self._calls.call(), self._lock:
            try:
                yield
            except self._errors as exc:
                raise ModelError(type(exc).__name__) from exc

    def complete(self, messages: list[dict[str, str]], *, max_tokens: int) -> str:
        """Greedy chat completion (a failure in llama.cpp a ModelError: `_calling`)."""
        with self._calling():
            result = self._llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
        return str(result["choices"][0]["message"]["content"] or "")  # type: ignore[index]

    def count_tokens(self, text: str) -> int:
        """Exact, with the model's own tokenizer."""
        with self._calling():
            return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False))

    def close(self) -> None:
        """Free the model (its weights' mapping, its context and llama.cpp's threads) once the calls in flight have
        ended; a call after it is ModelClosed."""
        if self._calls.closing():
            self._llm.close()


class OpenAIGenerator:
    """An OpenAI-compatible chat server inside the network (vLLM, llama.cpp server, Ollama, TGI)."""

    name = "openai"
    template_tokens = 0  # the server's template is not known here: a prompt it finds too long is its 400, a fallback
    control_tokens: frozenset[str] = frozenset()  # nor its vocabulary: the common templates' tokens are kept out

    def __init__(self, settings: Settings) -> None:
        if not settings.llm_host_allowed:  # settings refuse this already; checked again where data would leave
            raise GovragError(ErrorCode.internal, "the model server is not on the allowlist")
        api_key = settings.llm_api_key
        self._headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {}
        self._url = str(settings.llm_base_url).rstrip("/") + "/v1/chat/completions"
        self.model_id = settings.llm_model
        self._timeout_seconds = settings.llm_timeout_seconds
        self._server = ThreadSessions(trust_env=False)  # proxy variables ignored; each API worker its own connection
        self._calls = _Calls()

    def complete(self, messages: list[dict[str, str]], *, max_tokens: int) -> str:
        """POST /v1/chat/completions, greedy, answered within llm_timeout_seconds in all (headers included) and
        MAX_REPLY_BYTES; proxy variables are ignored. The calling thread's connection to the server is kept for its
        next call.

        Any failure to call the server or read its reply (a status, a slow or huge reply, JSON nested too deep to
        parse, a missing field) is a ModelError, so the caller falls back to the extractive answer. So is a request
        the server dropped unanswered on a kept connection (closing it as the request went out): it may have started
        the generation, which is never sent twice; the next call opens a new connection."""
        request = {"model": self.model_id, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        with self._calls.call():
            return self._answer(request)

    def _answer(self, request: dict[str, object]) -> str:
        """The reply's text, or a ModelError naming the failure's type."""
        try:
            body = self._server.request_within("POST", self._url, seconds=self._timeout_seconds,
                                               max_bytes=MAX_REPLY_BYTES, json=request, headers=self._headers)
            return str(json.loads(body)["choices"][0]["message"]["content"] or "")
        except Exception as exc:  # noqa: BLE001 - every way the reply can be unusable, RecursionError included
            raise ModelError(type(exc).__name__) from exc

    def count_tokens(self, text: str) -> int:
        """Estimate from length (over-counts for English, so the budget holds)."""
        return int(len(text) / CHARS_PER_TOKEN) + 1

    def close(self) -> None:
        """Close the connections and event loops of every thread that called, once the calls in flight have ended, and
        forget the API key (its Authorization header): a closed backend, kept in the cache (`_Cached`), holds no
        secret. A call after it is ModelClosed, refused before any header is read."""
        if self._calls.closing():
            self._headers = {}
            self._server.close()


CacheKey = tuple[object, ...]


@dataclass
class _Cached:
    """A backend in the cache, how many holders it has (`hold_generator`), and whether its last holder let go (closed:
    kept so that a call after it is ModelClosed, not a new backend nobody holds; the next hold makes a new one)."""

    generator: Generator
    holders: int = 0
    closed: bool = False


# A forked child makes its own (llama.cpp's threads, a client's connections): the parent's, held or not, are kept
# referenced there and never closed (`forksafe.rebuilt_in_child`), and a release in the child finds none of them.
_GENERATORS: dict[CacheKey, _Cached] = {}
forksafe.rebuilt_in_child(_GENERATORS)
_GENERATORS_LOCK = forksafe.lock()


def get_generator(settings: Settings) -> Generator | None:
    """The configured model, or None for the extractive backend (loaded once per configuration, `_cache_key`): the
    one held (`hold_generator`); once its last holder let go, the closed one (a query as the API stops: ModelClosed,
    the extractive answer), never a new one that nobody would hold nor close; with no holder ever (a bench's or a
    test's caller without an API), made and kept for the process's life."""
    if settings.answer_backend == "extractive":
        return None
    key = _cache_key(settings)
    with _GENERATORS_LOCK:
        if key not in _GENERATORS:
            _GENERATORS[key] = _Cached(_made(settings))
        return _GENERATORS[key].generator


class GeneratorHold:
    """A holder's claim on a backend (`hold_generator`); `generator` is None for the extractive backend."""

    def __init__(self, generator: Generator | None, key: CacheKey | None) -> None:
        self.generator, self._key, self._released = generator, key, False

    def release(self) -> None:
        """Let go of the backend (a second release does nothing); the last holder's release closes it, once its calls
        in flight have ended (a call after it is ModelClosed), and leaves it in the cache closed: `get_generator`
        hands that one on (a query as the API stops), the next `hold_generator` makes a new one. It blocks while the
        calls run and closing runs an event loop: called from a thread, never on a running event loop."""
        with _GENERATORS_LOCK:
            if self._released or self._key is None:
                return
            self._released = True
            cached = _GENERATORS.get(self._key)
            if cached is None or cached.generator is not self.generator:  # in a forked child: its parent's to close
                return
            cached.holders -= 1
            if cached.holders > 0:
                return
            cached.closed = True  # kept closed: a call after this is ModelClosed; the next hold makes a new one
        cached.generator.close()


def hold_generator(settings: Settings) -> GeneratorHold:
    """The configured model, loaded if it is not, held until the hold is released (the API holds it from its start to
    its stop: api.app): released by its last holder, it is closed, never left open for the process's life. One its
    last holder closed is replaced by a new one (an API started again in the same process)."""
    if settings.answer_backend == "extractive":
        return GeneratorHold(None, None)
    key = _cache_key(settings)
    with _GENERATORS_LOCK:
        if key not in _GENERATORS or _GENERATORS[key].closed:  # an API started again in this process: a new one
            _GENERATORS[key] = _Cached(_made(settings))
        cached = _GENERATORS[key]
        cached.holders += 1
    return GeneratorHold(cached.generator, key)


def _made(settings: Settings) -> Generator:
    """A new backend for `settings` (made with _GENERATORS_LOCK held: one load of a model at a time)."""
    if settings.answer_backend == "llamacpp" and settings.llm_model_path is not None:
        return LlamaCppGenerator(settings.llm_model_path, settings.llm_context_tokens)
    return OpenAIGenerator(settings)


def _cache_key(settings: Settings) -> CacheKey:
    """What makes one backend another: llama.cpp's file and window (the window is the prompt budget); the server's
    URL, model name, timeout and API key, the key by its SHA-256 alone (never kept in a key that a repr would show)."""
    if settings.answer_backend == "llamacpp" and settings.llm_model_path is not None:
        return ("llamacpp", str(settings.llm_model_path), settings.llm_context_tokens)
    api_key = settings.llm_api_key.get_secret_value() if settings.llm_api_key is not None else None
    key_digest = hashlib.sha256(api_key.encode()).hexdigest() if api_key is not None else None
    return ("openai", settings.llm_base_url, settings.llm_model, settings.llm_timeout_seconds, key_digest)
