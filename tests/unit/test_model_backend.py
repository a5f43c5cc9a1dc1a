"""The openai backend against a local stub server: every unusable reply is a ModelError (the extractive fallback)."""

from __future__ import annotations

import itertools
import json
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from pydantic import SecretStr

from core.settings import Settings
from retrieval import models
from retrieval.models import MAX_REPLY_BYTES, ModelClosed, ModelError, OpenAIGenerator, get_generator, hold_generator
from tests.support.forking import exit_code_of_child
from tests.support.stub_model import StubModel

Reply = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture
def serve() -> Iterator[Callable[[Reply], OpenAIGenerator]]:
    """Start a stub model server answering with `reply`; a generator pointed at it (timeout 1 s)."""
    servers: list[ThreadingHTTPServer] = []

    def start(reply: Reply) -> OpenAIGenerator:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                reply(self)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return OpenAIGenerator(Settings(answer_backend="openai", llm_timeout_seconds=1.0,
                                        llm_base_url=f"http://127.0.0.1:{server.server_port}"))

    yield start
    for server in servers:
        server.shutdown()


def _send(body: bytes, length: int | None = None) -> Reply:
    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except OSError:
            pass  # the client stopped reading
    return reply


def _trickle(ended: list[str], done: threading.Event) -> Reply:
    """One byte every 0.3 s, 12 s in all: never idle long enough for a per-read timeout. `ended` says how it ended:
    "hung up" when the client closed the connection first, "finished" when it read to the end."""
    def reply(handler: BaseHTTPRequestHandler) -> None:
        _send(b"", length=100_000)(handler)
        try:
            for _ in range(40):
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(0.3)
            ended.append("finished")
        except OSError:
            ended.append("hung up")
        done.set()
    return reply


def _complete(generator: OpenAIGenerator) -> str:
    return generator.complete([{"role": "user", "content": "q"}], max_tokens=8)


def test_a_well_formed_reply_is_the_answer(serve) -> None:
    generator = serve(_send(b'{"choices": [{"message": {"content": "Economy [1]."}}]}'))
    assert _complete(generator) == "Economy [1]."


@pytest.mark.parametrize("body", [
    b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # a RecursionError in the JSON parser
    b'{"choices": "not a list"}',
    b"not json",
])
def test_an_unreadable_reply_is_a_model_error(serve, body: bytes) -> None:
    with pytest.raises(ModelError):
        _complete(serve(_send(body)))


def test_a_reply_over_the_size_cap_is_a_model_error(serve) -> None:
    with pytest.raises(ModelError):
        _complete(serve(_send(b'{"choices": [{"message": {"content": "' + b"a" * MAX_REPLY_BYTES + b'"}}]}')))


def test_a_redirect_is_not_followed(serve) -> None:
    """A model server redirecting the call (here to another server on the allowlist; it could be any host) is a
    ModelError: the prompt, customer data, goes to the configured URL only."""
    reached: list[str] = []
    elsewhere = serve(lambda handler: (reached.append(handler.path), _send(b"{}")(handler)))

    def redirect(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(307)
        handler.send_header("Location", elsewhere._url)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with pytest.raises(ModelError):
        _complete(serve(redirect))
    assert reached == []


def test_a_trickling_server_cannot_hold_the_call_past_the_timeout(serve) -> None:
    """llm_timeout_seconds is 1; the server would go on for 12 s. The call gives up and hangs up before the end."""
    ended, done = [], threading.Event()
    with pytest.raises(ModelError):
        _complete(serve(_trickle(ended, done)))
    assert done.wait(timeout=60)
    assert ended == ["hung up"]


class _KeptAliveModel:
    """A model server keeping its HTTP/1.1 connections alive: for each request, the connection it came on (numbered
    as accepted) and its question; when `drops_on_kept`, a request that is not the first on its connection is dropped
    unanswered (the server closes the connection as it comes in, as one closing an idle connection would)."""

    def __init__(self, *, drops_on_kept: bool = False) -> None:
        self.requests: list[tuple[int, str]] = []
        accepted, model = itertools.count(), self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.number, self.answered = next(accepted), 0

            def do_POST(self) -> None:  # noqa: N802
                asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model.requests.append((self.number, asked["messages"][0]["content"]))
                if drops_on_kept and self.answered:
                    self.close_connection = True
                    return
                self.answered += 1
                _send(b'{"choices": [{"message": {"content": "Economy [1]."}}]}')(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.generator = OpenAIGenerator(Settings(answer_backend="openai", llm_timeout_seconds=10.0,
                                                  llm_base_url=f"http://127.0.0.1:{self.server.server_port}"))

    def connections_of(self, question: str) -> set[int]:
        return {connection for connection, asked in self.requests if asked == question}


@pytest.fixture
def kept_alive() -> Iterator[Callable[..., _KeptAliveModel]]:
    started: list[_KeptAliveModel] = []

    def start(**behaviour: bool) -> _KeptAliveModel:
        started.append(_KeptAliveModel(**behaviour))
        return started[-1]

    yield start
    for model in started:
        model.server.shutdown()
        model.server.server_close()


def _ask(generator: OpenAIGenerator, question: str) -> str:
    return generator.complete([{"role": "user", "content": question}], max_tokens=8)


def test_each_api_worker_keeps_its_own_connection_to_the_model_server(kept_alive) -> None:
    """Every generation opened a connection of its own. The API's worker threads each keep one: three answering at
    once, twice each, open three connections, each its thread's alone."""
    model = kept_alive()
    all_asked = threading.Barrier(3)

    def ask_twice(question: str) -> None:
        for _ in range(2):
            assert _ask(model.generator, question) == "Economy [1]."
            all_asked.wait(10)

    questions = ["first", "second", "third"]
    with ThreadPoolExecutor(max_workers=3) as workers:  # each blocks at the barrier: three threads
        for asked in [workers.submit(ask_twice, question) for question in questions]:
            asked.result()
    assert [len(model.connections_of(question)) for question in questions] == [1, 1, 1]
    assert len(set.union(*(model.connections_of(question) for question in questions))) == 3


def test_a_generation_dropped_on_a_kept_connection_is_a_model_error_never_sent_twice(kept_alive) -> None:
    """The server may have started a generation it dropped unanswered (a POST, no idempotent method): it is not sent
    again, the caller falls back to the extractive answer; the next generation goes out on a new connection."""
    model = kept_alive(drops_on_kept=True)
    assert _ask(model.generator, "first") == "Economy [1]."
    with pytest.raises(ModelError) as failed:
        _ask(model.generator, "dropped")
    assert isinstance(failed.value.__cause__, httpx.RemoteProtocolError)
    assert model.requests == [(0, "first"), (0, "dropped")]
    assert _ask(model.generator, "next") == "Economy [1]."
    assert model.requests[-1] == (1, "next")


@pytest.fixture
def stub() -> Iterator[StubModel]:
    model = StubModel()
    yield model
    model.server.shutdown()
    model.server.server_close()


def _answering_through(stub: StubModel, **changes: object) -> Settings:
    return Settings(answer_backend="openai", llm_base_url=stub.url, llm_model="stub", **changes)


def test_a_backend_held_twice_stays_open_until_its_last_holder_lets_go(stub: StubModel) -> None:
    """The API holds its backend from start to stop (api.app), as a test's answering_through does while its block
    runs: the first release leaves it open, in the cache, for the other holder; the last one closes it."""
    settings = _answering_through(stub)
    first, second = hold_generator(settings), hold_generator(settings)
    assert first.generator is second.generator is get_generator(settings)
    first.release()
    first.release()  # a hold is released once: its second release does not count as the other holder's
    assert _complete(second.generator) == "I don't know."
    assert get_generator(settings) is second.generator
    second.release()
    with pytest.raises(ModelClosed):
        _complete(second.generator)
    assert len(stub.requests) == 1


def test_a_query_after_the_last_release_gets_the_closed_backend_and_a_new_hold_a_new_one(stub: StubModel) -> None:
    """The last release took the backend out of the cache: a query arriving after it (the API stopping, a request
    still being answered) made a new backend that nobody held, so nobody closed it, its connections and event loops
    open for the process's life. Now it gets the closed one (ModelClosed: the extractive answer), nothing sent; an API
    started again in the same process (a new hold) gets a new backend, which answers, and its release closes it."""
    settings = _answering_through(stub)
    first = hold_generator(settings)
    first.release()
    late = get_generator(settings)
    assert late is first.generator  # main: a new backend, unheld
    with pytest.raises(ModelClosed):
        _complete(late)
    again = hold_generator(settings)
    assert again.generator is not first.generator and _complete(again.generator) == "I don't know."
    assert get_generator(settings) is again.generator
    again.release()
    with pytest.raises(ModelClosed):
        _complete(get_generator(settings))
    assert len(stub.requests) == 1


def test_a_close_waits_for_the_call_in_flight_and_refuses_those_after_it(stub: StubModel) -> None:
    """The last release comes while a query's answer is being made (the API stopping under it): the call ends with
    its answer, the close waits for it, and a call after the close began is ModelClosed, nothing sent."""
    answering, reply_now = threading.Event(), threading.Event()

    def first_waits(_messages: list[dict[str, str]]) -> str:
        if answering.is_set():
            return "late"
        answering.set()
        reply_now.wait(30)
        return "answered"

    stub.reply = first_waits
    hold = hold_generator(_answering_through(stub))
    with ThreadPoolExecutor(max_workers=2) as threads:
        call = threads.submit(_complete, hold.generator)
        assert answering.wait(30)
        closing = threads.submit(hold.release)
        refused = False
        while not refused:  # calls before the close began are answered ("late"); then refused
            try:
                assert _complete(hold.generator) == "late"
            except ModelClosed:
                refused = True
        assert not closing.done()  # the call in flight holds it
        reply_now.set()
        assert call.result(timeout=30) == "answered"
        closing.result(timeout=30)
    with pytest.raises(ModelClosed):
        _complete(hold.generator)


def test_settings_differing_in_the_api_key_or_the_timeout_share_no_backend(stub: StubModel) -> None:
    """The cache key left out the API key and the timeout: a second configuration differing only in them was answered
    by the first's backend, with the first's key and time limit. The key is in the cache by its SHA-256 alone."""
    keyed = _answering_through(stub, llm_api_key=SecretStr("first-secret-key"))
    holds = [hold_generator(settings) for settings in (
        keyed, keyed.model_copy(update={"llm_api_key": SecretStr("second-secret-key")}),
        keyed.model_copy(update={"llm_timeout_seconds": 5.0}))]
    try:
        assert len({id(hold.generator) for hold in holds}) == 3
        assert "secret-key" not in repr(list(models._GENERATORS))
    finally:
        for hold in holds:
            hold.release()


def _holds(found: object, secret: str, seen: set[int] | None = None) -> bool:
    """Whether `secret` is in a string or bytes reachable from `found` through attributes, mappings and collections
    (an httpx client's headers included), modules, classes and functions left out."""
    seen = set() if seen is None else seen
    if id(found) in seen or isinstance(found, type | types.ModuleType | types.FunctionType | types.MethodType):
        return False
    seen.add(id(found))
    if isinstance(found, str | bytes):
        return secret in (found if isinstance(found, str) else found.decode("latin-1"))
    if isinstance(found, dict):
        return any(_holds(part, secret, seen) for item in found.items() for part in item)
    if isinstance(found, list | tuple | set | frozenset):
        return any(_holds(part, secret, seen) for part in found)
    if isinstance(found, httpx.Headers):
        return _holds(found.raw, secret, seen)
    parts = vars(found).values() if hasattr(found, "__dict__") else ()
    slots = [getattr(found, name, None) for name in getattr(type(found), "__slots__", ())]
    return any(_holds(part, secret, seen) for part in [*parts, *slots])


def test_a_closed_backend_holds_no_copy_of_the_api_key(stub: StubModel) -> None:
    """A backend its last holder closed stays in the cache (a late query gets it: ModelClosed), so its Authorization
    header kept the API key in memory for the process's life. Closing forgets it; a call after that still fails closed,
    nothing sent."""
    hold = hold_generator(_answering_through(stub, llm_api_key=SecretStr("kept-secret-key")))
    assert _complete(hold.generator) == "I don't know."
    assert _holds(hold.generator, "kept-secret-key")  # the walk finds it while the backend is open
    hold.release()
    assert not _holds(hold.generator, "kept-secret-key")  # main: its _headers still held "Bearer kept-secret-key"
    with pytest.raises(ModelClosed):
        _complete(hold.generator)
    assert len(stub.requests) == 1


def test_a_forked_child_releasing_its_parents_hold_leaves_the_parents_backend_open(stub: StubModel) -> None:
    """A forked child's cache starts empty (its parent's backends kept, never closed): the parent's hold released
    there closes nothing, and the parent's connection and event loop, which the child shares, still answer."""
    hold = hold_generator(_answering_through(stub))
    try:
        assert _complete(hold.generator) == "I don't know."

        def release_in_child() -> bool:
            hold.release()
            return True

        assert exit_code_of_child(release_in_child) == 0
        assert _complete(hold.generator) == "I don't know."
    finally:
        hold.release()
    assert len(stub.requests) == 2
