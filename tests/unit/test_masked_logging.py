"""Known PII, secrets and tokens logged through every handler (root, uvicorn, celery, ad hoc) never come out."""

from __future__ import annotations

import io
import logging
import logging.config

import pytest
import uvicorn.config
from celery import Celery
from celery.utils.log import get_task_logger

from core.logs import (
    PASSWORD_PARAMETERS,
    JsonFormatter,
    configure_logging,
    mask,
    mask_all_handlers,
    request_id_var,
    stored_request_id,
)
from tests.support.cpu_bound import cpu_seconds_of

SECRETS = {
    "email": "maria.gonzalez@example.com",
    "jwt": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",
    "bearer": "Bearer opaque-access-token-123456",
    "ssn": "123-45-6789",
    "card": "4111 1111 1111 1111",
    "iban": "DE89 3704 0044 0532 0130 00",
    "phone": "(212) 555-0142",
    "password": "password=hunter2-Secret!",
    "api_key": "api_key: 9f8e7d6c5b4a39281706",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "openai": "sk-proj-abcdefghijklmnopqrstuvwx",
    "dsn": "postgresql://govrag:s3cretpass@postgres:5432/govrag",
    "pem": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
}
FORBIDDEN = ["maria.gonzalez", "eyJhbGciOiJSUzI1NiJ9", "opaque-access-token", "123-45-6789", "4111 1111",
             "3704 0044", "555-0142", "hunter2", "9f8e7d6c5b4a39281706", "AKIAIOSFODNN7EXAMPLE", "sk-proj-abc",
             "s3cretpass", "MIIEvQIBADAN"]


def _emit_everything(logger: logging.Logger) -> None:
    for label, value in SECRETS.items():
        logger.warning("%s seen: %s", label, value)
    logger.info(f"f-string too: {SECRETS['email']} {SECRETS['jwt']}")
    try:
        raise ValueError(f"failed for {SECRETS['email']} with {SECRETS['password']}")
    except ValueError:
        logger.exception("boom %s", SECRETS["ssn"])


def _assert_clean(text: str) -> None:
    assert text, "nothing was logged"
    leaked = [needle for needle in FORBIDDEN if needle in text]
    assert leaked == [], leaked


def test_mask_covers_every_known_kind() -> None:
    for value in SECRETS.values():
        _assert_clean(mask(f"x {value} y") + " ")


def test_credentials_after_an_authorization_scheme_word_are_masked() -> None:
    """`Authorization: Basic <credentials>`: the credentials, not the scheme word, are the secret."""
    for scheme, credentials in [("Basic", "dXNlcjpwYXNzd29yZA=="), ("Digest", "c2VjcmV0ZGlnZXN0"),
                                ("Bearer", "opaque-access-token-123456")]:
        masked = mask(f"upstream said Authorization: {scheme} {credentials} (401)")
        assert credentials not in masked and f"{scheme} <SECRET>" in masked, masked


@pytest.mark.parametrize("line, secret", [
    ("GOVRAG_MASTER_KEY=q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=", "q83vEjRWeJCrze8S"),
    ("GOVRAG_AUDIT_CHECKPOINT_KEY=ze8SNFZ4kKvN7xI0VniQq83vEjRWeJCrze8SNFZ4kKs=", "ze8SNFZ4kKvN7xI0"),
    ("GOVRAG_METRICS_TOKEN=scrape-secret-123", "scrape-secret-123"),
    ("GOVRAG_LLM_API_KEY=localkey123456", "localkey123456"),
    ("{'password': 'hunter2 Secret', 'user': 'svc'}", "hunter2"),
    ('{"client_secret": "first second"}', "second"),
    ("broker redis://:s3cretpass@redis:6379/0", "s3cretpass"),
])
def test_project_variables_quoted_values_and_password_only_urls_are_masked(line: str, secret: str) -> None:
    """A name ending a longer one (`GOVRAG_..._KEY`), a Python repr's quotes, a URL with a password and no user."""
    assert secret not in mask(line), mask(line)


@pytest.mark.parametrize("line, secret, kept", [
    ("broker redis://govrag:hunter@2:s3cret@redis:6379/0 down", "s3cret", "@redis:6379/0 down"),
    ("broker REDIS://:s3cretpass@redis:6379/0 down", "s3cretpass", "@redis:6379/0 down"),
    ("broker redis://us@er:s3cretpass@redis:6379/0 down", "s3cretpass", "@redis:6379/0 down"),
    ("model http://ops:s3c@ret@[::1]:8000/v1 down", "ret", "@[::1]:8000/v1 down"),
    ("db postgresql+psycopg://govrag:pa#s3cret@db/govrag down", "s3cret", "@db/govrag down"),
    ("db postgresql+psycopg://govrag:pa?s3cret@db/govrag down", "s3cret", "@db/govrag down"),
    ("db POSTGRESQL://govrag:pa:s3cret%40x@db/govrag down", "s3cret", "@db/govrag down"),
    ("retry 2 ...redis://:s3cretpass@redis:6379/0", "s3cretpass", "retry 2 ...<URL_WITH_CREDENTIALS>@redis"),
    ("model http://vllm.internal:8000/v1?to=ops@example.org down", "ops@example.org", "http://vllm.internal:8000/v1?"),
])
def test_a_url_s_credentials_end_at_the_last_at_sign_before_its_path(line: str, secret: str, kept: str) -> None:
    """The user information ends at the last `@` (RFC 3986), so the mask ended a password at its first `@` (the
    rest of it logged) and read no upper-case scheme. A `?` or `#` ends no password: SQLAlchemy reads one up to its
    `@`, and a database URL holding one is taken. A `/` ends it, so an address in a path or query is the e-mail
    mask's, the host kept."""
    masked = mask(line)
    assert secret not in masked and kept in masked, masked


# Log lines of 200,000 characters a masking pattern read more than once per character: minutes of CPU each, on
# every handler, for a line any caller or document can put into the logs.
ADVERSARIAL_LINES = {
    "scheme letters": "a" * 200_000, "upper-case scheme letters": "A" * 200_000, "dotted": "a." * 100_000,
    "digits": "1" * 200_000, "colons": "a://" + ":" * 200_000, "password colons": "a://:" + ":" * 200_000 + "x",
    "at signs": "a://" + "@" * 200_000, "scheme then colons": "a" * 100_000 + "://" + ":" * 100_000,
    "schemes": "a://:" * 40_000, "e-mail local parts": "a." * 100_000 + "@", "e-mail domains": "a@" + "b" * 200_000,
}


def _mask_every_adversarial_line(finished: list[str]) -> None:
    for name, line in ADVERSARIAL_LINES.items():
        mask(line)
        finished.append(name)


def test_every_log_line_is_masked_in_linear_time() -> None:
    """A hang guard with a huge margin (a few seconds of CPU now; a quadratic pattern takes minutes), not a
    timing target: the child counts its own CPU for the masking alone. In a subprocess: a regex holds the GIL."""
    finished, cpu_seconds = cpu_seconds_of("tests.unit.test_masked_logging", "_mask_every_adversarial_line")
    assert finished == len(ADVERSARIAL_LINES) and cpu_seconds < 30


@pytest.mark.parametrize("line, secret, kept", [
    ("connect host=db user=app sslpassword=Ssl-Secret-1 dbname=govrag", "Ssl-Secret-1", "dbname=govrag"),
    ("postgresql://govrag@db/govrag?SSLPassword=Ssl-Secret-1&sslmode=require", "Ssl-Secret-1", "govrag@db"),
    ("host=db passfile=/run/secrets/pgpass-7781 dbname=govrag", "pgpass-7781", "dbname=govrag"),
    ("host=db sslpassword = 'Ssl Secret 1' user=app", "Secret 1", "user=app"),
    (r"host=db password='it\'s a long secret' user=app", "long secret", "user=app"),
    (r"host=db password=two\ words user=app", "words", "user=app"),
    ("PGPASSWORD=Pg-Secret-9 psql -h db", "Pg-Secret-9", "psql -h db"),
    ('{"sslpassword": "Ssl-Secret-1", "host": "db"}', "Ssl-Secret-1", '"host": "db"'),
])
def test_libpq_password_options_in_a_dsn_or_url_are_masked(line: str, secret: str, kept: str) -> None:
    """`sslpassword=` and `passfile=` were logged as written (only `password` was known), and a quoted DSN value
    with an escaped quote (`'it\\'s ...'`) or an escaped space (`two\\ words`) kept all after the escape."""
    masked = mask(line)
    assert secret not in masked and "<SECRET>" in masked and kept in masked, masked


@pytest.mark.parametrize("name", sorted(PASSWORD_PARAMETERS))
def test_every_parameter_migrate_hides_from_a_url_is_masked_in_a_log_line(name: str) -> None:
    """`core.migrate` leaves these out of a database URL it prints; a log line masks the same names."""
    for written in (name, name.upper(), name.title()):
        assert mask(f"dsn: host=db {written}=Value-7781 port=5432") == f"dsn: host=db {written}=<SECRET> port=5432"


def test_a_setting_whose_name_merely_contains_a_secret_word_is_kept() -> None:
    assert mask("llm_max_answer_tokens: 256") == "llm_max_answer_tokens: 256"


def test_a_question_masked_for_the_ledger_keeps_no_opaque_bearer_token() -> None:
    """The NER may tag `Bearer` as a person; the token it introduces must be masked all the same."""
    from audit.service import mask_questions

    masked = mask_questions(["Authorization: Bearer s3cr3tT0kenValue99 fails", "token: Basic dXNlcjpwYXNzd29yZA=="])
    assert "s3cr3tT0kenValue99" not in masked[0] and "dXNlcjpwYXNzd29yZA" not in masked[1], masked


def test_every_handler_masks_including_uvicorn_and_celery(clean_logging: None) -> None:
    logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)  # uvicorn's own handlers, propagate=False
    adhoc = logging.getLogger("govrag.adhoc")
    adhoc.addHandler(logging.StreamHandler(io.StringIO()))
    adhoc.propagate = False
    configure_logging()
    mask_all_handlers()
    root = logging.getLogger()
    streams = {}
    for logger in [root, adhoc]:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler):
                streams[id(handler)] = io.StringIO()
                handler.setStream(streams[id(handler)])
    Celery("masking-test", broker="memory://").log.setup_logging_subsystem(loglevel="INFO")
    token = request_id_var.set("req-masking")
    try:
        for name in ["govrag.test", "uvicorn", "uvicorn.error", "uvicorn.access", "celery.worker",
                     "celery.app.trace", "govrag.adhoc"]:
            _emit_everything(logging.getLogger(name))
        _emit_everything(get_task_logger("workers.tasks.ingest"))
    finally:
        request_id_var.reset(token)
    output = "".join(stream.getvalue() for stream in streams.values())
    _assert_clean(output)
    assert "<EMAIL>" in output and "<SECRET>" in output and "<TOKEN>" in output
    json_lines = [line for line in output.splitlines() if line.startswith("{")]
    assert json_lines and all('"request_id": "req-masking"' in line for line in json_lines)
    assert any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    assert all(h.filters for lg in (root, adhoc) for h in lg.handlers)


DOCUMENT_TEXT = ("the salary review committee met on 14 March", "could not parse: Maria approved a 6 percent raise")


def test_an_exception_is_logged_as_its_frames_never_its_message(clean_logging: None) -> None:
    """A library's message may quote a document's text, which no mask recognises: the log keeps types and frames."""
    configure_logging("INFO")
    stream = io.StringIO()
    ours = next(h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter))
    ours.setStream(stream)  # type: ignore[attr-defined]
    try:
        try:
            raise KeyError(DOCUMENT_TEXT[0])  # the frame shows this line of source, not the value
        except KeyError as inner:
            raise ValueError(DOCUMENT_TEXT[1]) from inner
    except ValueError:
        logging.getLogger("govrag.parse").exception("parsing failed")
    logged = stream.getvalue()
    assert "parsing failed" in logged and "builtins.ValueError" in logged and "builtins.KeyError" in logged
    assert "test_an_exception_is_logged_as_its_frames_never_its_message" in logged  # the frame
    assert "salary review" not in logged and "6 percent" not in logged


def test_an_ingestion_retry_hands_celery_the_fault_type_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery logs the exception a task retries with ("Retry in 1s: ..."): it gets a stand-in naming the type."""
    from types import SimpleNamespace

    from ingestion import service
    from workers import tasks

    def fails(**_: object) -> None:
        raise ValueError("could not parse: Maria approved a 6 percent raise")

    handed: list[BaseException] = []

    def retry(exc: BaseException, **_: object) -> Exception:
        handed.append(exc)
        return RuntimeError("retry scheduled")

    monkeypatch.setattr(service, "run_ingestion", fails)
    task = SimpleNamespace(app=SimpleNamespace(govrag_settings=None), request=SimpleNamespace(retries=0), retry=retry)
    with pytest.raises(RuntimeError, match="retry scheduled"):
        tasks.ingest_document(task, "doc", "job")  # type: ignore[arg-type]
    assert [type(e).__name__ for e in handed] == ["TransientFault"] and str(handed[0]) == "ValueError"


def test_at_debug_parser_libraries_stay_at_warning(clean_logging: None) -> None:
    """At GOVRAG_LOG_LEVEL=DEBUG pdfminer logged a PDF's text token by token, unstructured the text it sorted."""
    logging.getLogger().handlers[:] = []
    configure_logging("DEBUG")
    assert logging.getLogger().isEnabledFor(logging.DEBUG)
    for name in ("pdfminer.psparser", "pdfminer.pdfinterp", "unstructured", "unstructured.trace", "presidio-analyzer"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
    assert logging.getLogger("ingestion.service").isEnabledFor(logging.DEBUG)


def test_at_info_http_clients_log_no_request_url(clean_logging: None) -> None:
    """httpx logged each request's full URL at INFO: an audit export's `user=` filter sent by the demo's client."""
    logging.getLogger().handlers[:] = []
    configure_logging("INFO")
    for name in ("httpx", "httpcore", "httpcore.http11"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name


@pytest.mark.parametrize("question, secret", [
    ("my password is hunter2, why can I not log in?", "hunter2"),
    ("The password is letmein", "letmein"),
    ("is it bad that our api key is 9f8e7d6c5b4a?", "9f8e7d6c5b4a"),
    ("the token is 'abc def ghi' for the build", "abc def ghi"),
    ("My passcode is 4821.", "4821"),
    ("the secret is Hunter-Two! right?", "Hunter-Two"),
])
def test_a_question_naming_a_secret_with_is_keeps_no_secret(question: str, secret: str) -> None:
    """`password is hunter2` was kept: the pattern needed `=` or `:`."""
    from audit.service import mask_questions

    [masked] = mask_questions([question])
    assert secret not in masked and "<SECRET>" in masked, masked


@pytest.mark.parametrize("sentence", [
    "the password policy is strict",
    "Is the password expired?",
    "the token is valid for 24 hours",
    "my password is wrong.",
    "the password is case-sensitive",
    "what is the password reset process?",
])
def test_a_sentence_about_a_secret_is_not_masked(sentence: str) -> None:
    assert mask(sentence) == sentence


@pytest.mark.parametrize("document_id", ["8f2a37ee-d26e-4b15-8694-810088041610",
                                         "12345678-1234-5678-9012-345678901234"])
def test_an_id_whose_digits_look_like_a_card_number_is_logged_whole(document_id: str) -> None:
    """An operator follows a document through the logs by its id: the number masks leave it, and the words around it,
    as they were."""
    line = f"the placeholder map of document {document_id} does not open under its key"
    assert mask(line) == line


def test_a_card_number_beside_an_id_is_still_masked_and_the_next_word_kept() -> None:
    line = mask("document 8f2a37ee-d26e-4b15-8694-810088041610 card 4111 1111 1111 1111 is refused")
    assert line == "document 8f2a37ee-d26e-4b15-8694-810088041610 card <NUMBER> is refused"


@pytest.mark.parametrize(("logged_under", "kept"), [
    ("0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
    ("cli-0123456789abcdef0123456789abcdef", "cli-0123456789abcdef0123456789abcdef"),
    ("-", None),
    ("0123456789abcdef0123456789abcdef\n{\"level\": \"ERROR\"}", None),
    ("f" * 65, None),
])
def test_a_row_keeps_the_request_id_it_was_written_under_only_as_govrag_makes_one(
        logged_under: str, kept: str | None) -> None:
    """An ingestion job keeps the request id it was queued under (`ingestion_jobs.request_id`, String(64)), which
    every send of its task carries to a worker. Every id a thread logs under is one govrag made (the API's own, a
    command run's, a task header's checked by `request_id_or_none`), and a row keeps no other: text that is not one,
    a line break after one or more than the column holds, is kept as none, as `-` is."""
    token = request_id_var.set(logged_under)
    try:
        assert stored_request_id() == kept
    finally:
        request_id_var.reset(token)
