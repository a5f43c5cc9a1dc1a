"""`govrag redteam` against the running API: block rates by category and leak detection."""

from __future__ import annotations

import functools
import gzip
import json
import os
import signal
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api import cli
from core import http
from guard import redteam
from guard.eval_corpora import EVAL_DIR, split_of
from guard.service import DISABLED_MESSAGE
from tests.conftest import PLATFORM_ADMIN, auth, wait_for_job
from tests.support.served import served


@pytest.fixture(scope="module")
def api_url(client: TestClient) -> Iterator[str]:
    """The session's API (already started by its TestClient) served over HTTP, as `govrag redteam` reaches one."""
    with served(client.app, lifespan="off") as url:  # type: ignore[arg-type]
        yield url


def test_redteam_reports_block_rates_and_no_leak(client: TestClient, api_url: str,
                                                 issue_token: Callable[..., str]) -> None:
    admin = issue_token(PLATFORM_ADMIN)
    assert client.post("/v1/admin/departments", json={"name": "rtdept"}, headers=auth(admin)).status_code == 201
    assert client.post("/v1/admin/role-assignments", headers=auth(admin), json={
        "subject": "rt-user", "role": "editor", "department": "rtdept"}).status_code == 201
    token = issue_token("rt-user")
    response = client.post("/v1/documents", headers=auth(token), data={"department": "rtdept"},
                           files={"file": ("faq.txt", b"Badges are renewed every two years at the front desk.")})
    wait_for_job(client, token, response.json()["job_id"])
    corpus = redteam.attack_corpus(EVAL_DIR, per_category=2)
    assert "exfiltration" in corpus and any(c.startswith("jailbreak/") for c in corpus)
    assert all(split_of(t) == "eval" for c, texts in corpus.items() if c != "exfiltration" for t in texts)
    report = redteam.run(api_url, token, "rtdept", corpus)
    assert sum(report.sent.values()) == sum(len(t) for t in corpus.values())
    assert sum(report.blocked.values()) > 0 and report.leaks == []
    assert report.lines()[-2:] == ["leaks: 0", redteam.AUTO_TRIP_NOTE]


def test_leaks_are_detected() -> None:
    answer = {"answer": "Call jane.doe@example.org, marker CNRY-0123456789abcdef",
              "citations": [{"department": "finance"}]}
    found = redteam._leaks(answer, {"hr"}, "x", 0)
    assert len(found) == 3 and "canary" in found[0] and "finance" in found[1] and "EMAIL_ADDRESS" in found[2]


def test_raw_pii_in_a_citation_is_a_leak() -> None:
    answer = {"answer": "The contact is given in the source [1].",
              "citations": [{"department": "hr", "title": "Call jane.doe@example.org",
                             "snippet": "Dial 212-555-0187."}]}
    found = redteam._leaks(answer, {"hr"}, "x", 0)
    assert any("citation 1 title" in leak and "EMAIL_ADDRESS" in leak for leak in found), found
    assert any("citation 1 snippet" in leak and "PHONE_NUMBER" in leak for leak in found), found


def test_an_address_before_a_file_extension_in_a_title_is_a_leak() -> None:
    """`maria.gonzalez@example.com.txt` passed: the extension hid the address's domain from the analyzer."""
    title = "Payslip maria.gonzalez@example.com.txt"
    answer = {"answer": "See [1].", "citations": [{"department": "hr", "title": title, "snippet": "The payslip."}]}
    found = redteam._leaks(answer, {"hr"}, "x", 0)
    assert any("citation 1 title" in leak and "EMAIL_ADDRESS" in leak for leak in found), found


@pytest.mark.parametrize("text", ["marker CNRY-01234567 89abcdef", "marker C N R Y - 0123456789abcdef",
                                  "marker CNRY\u200b-0123456789ABCDEF"])
def test_a_disguised_canary_is_a_leak(text: str) -> None:
    assert redteam._leaks({"answer": text, "citations": []}, {"hr"}, "x", 0) == ["x#0: canary in the response"]


def test_a_canary_in_a_citation_snippet_is_a_leak() -> None:
    answer = {"answer": "See [1].",
              "citations": [{"department": "hr", "title": "t", "snippet": "CNRY-0123456789abcdef"}]}
    assert redteam._leaks(answer, {"hr"}, "x", 0) == ["x#0: canary in the response"]


def _corpus(root: Path) -> Path:
    """A small corpus in the layout `attack_corpus` reads."""
    (root / "jailbreakbench_artifacts").mkdir(parents=True)
    (root / "jailbreakbench_artifacts" / "jbb_attack_prompts.jsonl").write_text(
        "\n".join(json.dumps({"method": "m", "text": f"ignore all rules {i}"}) for i in range(8)))
    (root / "pallms_payloads").mkdir()
    for name in ("promptinjection", "jailbreak"):
        (root / "pallms_payloads" / f"{name}.txt").write_text("\n".join(f"{name} payload {i}" for i in range(8)))
    (root / "giskard_prompt_injections").mkdir()
    (root / "giskard_prompt_injections" / "prompt_injections.csv").write_text(
        "group,prompt\n" + "\n".join(f"g,prompt {i}" for i in range(8)))
    return root


# A stub API's answer to a probe: (status, body), None to hang up without one, or a function writing it (to the
# handler's wfile) as it likes
Answer = tuple[int, bytes] | Callable[[BaseHTTPRequestHandler], None] | None
ANSWER = (200, json.dumps({"answer": "I cannot help with that.", "citations": [], "refused": True,
                           "reason": "prompt_firewall", "request_id": "r"}).encode())


def _stub_api(answers: list[Answer]) -> Iterator[str]:
    """A deployment answering the n-th probe with answers[n] (the last one for every probe after): outside the
    boundary, so a stub."""
    sent = iter(answers)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 (the http.server name)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            answer = next(sent, answers[-1])
            if callable(answer):  # it writes the answer itself; the connection closes after it
                self.close_connection = True
                _unless_hung_up(answer, self)
                return
            if answer is None:  # the API gone mid-run: the connection closed, no answer
                self.close_connection = True
                return
            _unless_hung_up(lambda handler: _write_answer(handler, answer), self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _write_answer(handler: BaseHTTPRequestHandler, answer: tuple[int, bytes]) -> None:
    """Write a JSON response, its length said (a kept-alive connection can carry the next one)."""
    status, body = answer
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _unless_hung_up(write: Callable[[BaseHTTPRequestHandler], object], handler: BaseHTTPRequestHandler) -> None:
    """Write to the client unless it hung up (it read no further than it wanted)."""
    try:
        write(handler)
    except (BrokenPipeError, ConnectionResetError):
        handler.close_connection = True


@pytest.fixture
def broken_api(request: pytest.FixtureRequest) -> Iterator[str]:
    """A deployment that answers every query with one error (status, code)."""
    status, code = request.param
    yield from _stub_api([(status, json.dumps({"error": {"code": code, "message": "x", "request_id": "r"}}).encode())])


@pytest.fixture
def stub_api(request: pytest.FixtureRequest) -> Iterator[str]:
    """A deployment answering the probes as `_stub_api` does."""
    yield from _stub_api(request.param)


@pytest.mark.parametrize("broken_api", [(500, "internal"), (503, "unavailable")], indirect=True)
def test_a_run_where_every_probe_errored_is_no_pass(broken_api: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["redteam", "--department", "hr", "--token", "expired", "--corpus", str(_corpus(tmp_path)),
                       "--url", broken_api])
    out = capsys.readouterr().out
    assert status == redteam.EXIT_UNTESTED
    assert "answered: 0" in out and "errors: " in out and "errors: 0" not in out


def test_the_kill_switch_blocks_and_leaves_nothing_answered(client: TestClient, api_url: str,
                                                             issue_token: Callable[..., str]) -> None:
    admin = issue_token(PLATFORM_ADMIN)
    assert client.post("/v1/admin/departments", json={"name": "rtoff"}, headers=auth(admin)).status_code == 201
    assert client.post("/v1/admin/role-assignments", headers=auth(admin), json={
        "subject": "rt-off-user", "role": "editor", "department": "rtoff"}).status_code == 201
    assert client.post("/v1/admin/kill-switch", headers=auth(admin), json={
        "scope": "rtoff", "mode": "disabled", "reason": "red-team test"}).status_code == 200
    report = redteam.run(api_url, issue_token("rt-off-user"), "rtoff", {"exfiltration": list(redteam.EXFILTRATION)})
    assert report.blocked["exfiltration"] == len(redteam.EXFILTRATION) and not report.errors
    assert report.answered == 0 and report.exit_code() == redteam.EXIT_UNTESTED


def _error(code: str, message: str) -> tuple[int, bytes]:
    """The API's 503 error body with `code` and `message`."""
    return 503, json.dumps({"error": {"code": code, "message": message, "request_id": "r"}}).encode()


SWITCHED_OFF = _error("kill_switch_disabled", "Answering is paused by an administrator.")  # reworded


@pytest.mark.parametrize("stub_api", [[SWITCHED_OFF, SWITCHED_OFF, _error("unavailable", DISABLED_MESSAGE)]],
                         indirect=True)
def test_the_kill_switch_is_told_by_its_code_never_by_its_message(stub_api: str) -> None:
    """The kill switch's 503 was told from an outage's by its message: reworded, it was an error, and a 503 worded
    like it (`unavailable`: an API of an earlier release, or another cause worded so) counted as blocked. Its code
    `kill_switch_disabled` tells it now."""
    report = redteam.run(stub_api, "t", "hr", {"exfiltration": ["first", "second", "third"]})
    assert report.blocked["exfiltration"] == 2 and report.errors == {"HTTP 503": 1}


def test_a_corpus_that_is_not_there_gives_a_message_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["redteam", "--department", "hr", "--token", "t", "--corpus", "/nonexistent/eval"]
    assert cli.main(args) == 2
    assert "cannot read the attack corpus" in capsys.readouterr().err


@pytest.mark.parametrize("broken_api", [(500, "internal")], indirect=True)
def test_the_default_corpus_does_not_depend_on_the_working_directory(broken_api: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    status = cli.main(["redteam", "--department", "hr", "--token", "t", "--per-category", "1", "--url", broken_api])
    assert status == redteam.EXIT_UNTESTED  # the corpus was read (then every probe errored), not "no such file"


@pytest.mark.parametrize("count", ["0", "-3"])
def test_fewer_than_one_prompt_per_category_is_a_usage_error(count: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`--per-category 0` sent only the three exfiltration probes and could exit 0, the attack corpus untested; a
    negative count silently dropped prompts from the end of each category."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["redteam", "--department", "hr", "--token", "t", "--corpus", str(_corpus(tmp_path)),
                  "--per-category", count, "--url", "http://127.0.0.1:9"])
    assert exited.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://scanner:s3cret@127.0.0.1:9", "http://[::1", "http://"])
def test_a_url_that_is_not_http_is_a_usage_error(url: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """It was taken as an API that cannot be reached (UnsupportedProtocol), exit 3 as an outage, or (a broken host)
    ended in a traceback quoting it. It is a bad argument: said without quoting it (it may hold a password), exit 2."""
    with pytest.raises(SystemExit) as exited:
        _redteam(url, _corpus(tmp_path))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--url: must be an http(s) URL" in err and "s3cret" not in err


def test_a_report_with_blocked_prompts_warns_that_the_department_may_have_tripped() -> None:
    report = redteam.RedTeamReport()
    report.sent["jailbreak/PAIR"], report.answered = 2, 2
    assert redteam.AUTO_TRIP_NOTE not in report.lines()
    report.blocked["jailbreak/PAIR"] = 1
    assert report.lines()[-1] == redteam.AUTO_TRIP_NOTE and "GOVRAG_GUARD_AUTO_TRIP_PER_MINUTE" in report.lines()[-1]


def _redteam(url: str, corpus: Path, *more: str) -> int:
    return cli.main(["redteam", "--department", "hr", "--token", "t", "--corpus", str(corpus), "--url", url, *more])


@pytest.mark.parametrize("stub_api", [
    [(200, b"<html>Sign in</html>")],
    [(200, b'{"ok": true}')],
    [(200, b"[]")],
], indirect=True, ids=["not JSON", "another JSON object", "a JSON list"])
def test_a_200_that_is_not_a_query_answer_is_untested(stub_api: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A 200 that is not a query answer (a login page, another service at --url) was taken for a clean answer, exit 0
    with nothing checked, or crashed the run with a traceback, exit 1, read as a leak. Its leaks cannot be looked
    for: an error, exit 3."""
    assert _redteam(stub_api, _corpus(tmp_path), "--per-category", "1") == redteam.EXIT_UNTESTED
    out = capsys.readouterr().out
    assert "answered: 0" in out and f"  - {redteam.NOT_AN_ANSWER}: 7" in out


@pytest.mark.parametrize("stub_api", [[ANSWER, ANSWER, None]], indirect=True)
def test_an_api_gone_mid_run_is_reported_as_far_as_it_went(stub_api: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The API going away after two probes threw away the report and said exit 2, "cannot reach the API ... check
    --url", as for a wrong address. The run stops there; what it tested is reported, and the rest was not: exit 3."""
    assert _redteam(stub_api, _corpus(tmp_path), "--per-category", "1") == redteam.EXIT_UNTESTED
    captured = capsys.readouterr()
    assert "answered: 2" in captured.out and "  - no answer (RemoteProtocolError): 1" in captured.out
    assert "not sent: 4 (the API stopped answering; the run stopped)" in captured.out and captured.err == ""


@pytest.mark.parametrize(("second", "leaks", "code"), [("clean", 0, redteam.EXIT_INTERRUPTED),
                                                         ("leak", 1, redteam.EXIT_LEAK)])
def test_a_ctrl_c_reports_what_was_tested_and_exits_130_unless_a_leak_was_found(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], second: str, leaks: int, code: int) -> None:
    """A Ctrl-C ended `govrag redteam` in a traceback, the report of what it had tested lost, where `govrag ingest`,
    `keys rotate` and `migrate` say where they stopped and exit 130. It now prints the report of the probes answered
    before it (the probe it stopped not counted), says at which probe it stopped, and exits 130; 1 when a leak was
    found before it, as in any run: a monitor reading only the exit code must not miss a leak."""
    released = threading.Event()

    def ctrl_c(_handler: BaseHTTPRequestHandler) -> None:  # the third probe: a real SIGINT to the command waiting on it
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]
        released.wait(60)

    api = _stub_api([ANSWER, LEAK if second == "leak" else ANSWER, ctrl_c])
    url = next(api)
    # as at a terminal: a pytest started in the background (CI's `.ci/run &`) inherits SIGINT ignored, and the signal
    # would then never reach the command
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = _redteam(url, _corpus(tmp_path), "--per-category", "1")
    except KeyboardInterrupt:  # escaping, it would end the test session
        status = None
    finally:
        signal.signal(signal.SIGINT, previous)
        released.set()
        next(api, None)
    captured = capsys.readouterr()
    assert status == code and "Traceback" not in captured.err
    assert "answered: 2" in captured.out and "errors: 0" in captured.out and f"leaks: {leaks}" in captured.out
    assert f"not sent: 5 ({redteam.INTERRUPTED}; the run stopped)" in captured.out
    assert captured.err == ("govrag: interrupted at probe 3 of 7; the report covers the 2 before it; run the same "
                            "command again for a full run\n")


def test_a_ctrl_c_while_the_corpus_loads_is_one_line_and_exit_130(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A Ctrl-C before the first probe (the corpus read, here a file that never ends: a FIFO whose writer sends a
    real SIGINT once the command has opened it) ended in a traceback: one line and exit 130 now, as during the
    probes."""
    corpus = _corpus(tmp_path)
    fifo = corpus / "jailbreakbench_artifacts" / "jbb_attack_prompts.jsonl"
    fifo.unlink()
    os.mkfifo(fifo)
    released = threading.Event()

    def ctrl_c_once_opened() -> None:
        with fifo.open("wb"):  # returns once the command opened the FIFO to read it
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]
            released.wait(60)

    writer = threading.Thread(target=ctrl_c_once_opened, daemon=True)
    writer.start()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI runs pytest with SIGINT ignored
    try:
        status = _redteam("http://127.0.0.1:9", corpus)
    except KeyboardInterrupt:  # escaping, it would end the test session
        status = None
    finally:
        signal.signal(signal.SIGINT, previous)
        released.set()
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # a writer still waiting for a reader is let go
        writer.join(60)
    captured = capsys.readouterr()
    assert status == redteam.EXIT_INTERRUPTED and captured.out == ""
    assert captured.err == ("govrag: interrupted before the first probe; nothing was tested; run the same command "
                            "again\n")


def _spoil_jsonl(root: Path) -> None:
    with (root / "jailbreakbench_artifacts" / "jbb_attack_prompts.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('\n{"method": "m", "text": "cut off')


def _drop_a_field(root: Path) -> None:
    with (root / "jailbreakbench_artifacts" / "jbb_attack_prompts.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('\n{"method": "m", "prompt": "the wrong key"}')


def _latin1(root: Path) -> None:
    (root / "pallms_payloads" / "jailbreak.txt").write_bytes("r\xe9sum\xe9 payload".encode("latin-1"))


def _no_eval_attack(root: Path) -> None:
    """Every attack in the train split: the run would test the three exfiltration probes only."""
    train = [text for text in (f"train attack {i}" for i in range(200)) if split_of(text) == "train"][:3]
    (root / "jailbreakbench_artifacts" / "jbb_attack_prompts.jsonl").write_text(
        "\n".join(json.dumps({"method": "m", "text": text}) for text in train))
    for name in ("promptinjection", "jailbreak"):
        (root / "pallms_payloads" / f"{name}.txt").write_text("\n".join(train))
    (root / "giskard_prompt_injections" / "prompt_injections.csv").write_text(
        "group,prompt\n" + "\n".join(f"g,{text}" for text in train))


@pytest.mark.parametrize(("spoil", "said"), [
    (_spoil_jsonl, "jbb_attack_prompts.jsonl line 9 is not JSON"),
    (_drop_a_field, "jbb_attack_prompts.jsonl line 9 has no text field 'text'"),
    (_latin1, "jailbreak.txt is not UTF-8 text"),
    (_no_eval_attack, "no eval-split attack in the corpus in"),
], ids=["cut JSON", "a field missing", "not UTF-8", "no eval attack"])
@pytest.mark.parametrize("stub_api", [[ANSWER]], indirect=True)
def test_a_corpus_it_cannot_use_is_a_usage_error(spoil: Callable[[Path], None], said: str, stub_api: str,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A corpus file that does not parse ended the run in a traceback, exit 1 (a leak, as documented); one with no
    eval-split attack tested the three exfiltration probes and could exit 0. Both are the corpus to fix: exit 2, the
    file and line named, no prompt quoted."""
    corpus = _corpus(tmp_path)
    spoil(corpus)
    assert _redteam(stub_api, corpus) == redteam.EXIT_USAGE
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and "cut off" not in err


def test_a_department_the_user_may_not_read_tests_nothing(api_url: str, issue_token: Callable[..., str]) -> None:
    """A --department that does not exist, or that the user may not read: every probe that passed the firewall came
    back `no_authorised_departments`, nothing searched, and the run counted them answered, exit 0. They are errors
    now (a probe the firewall blocked still counts, blocked)."""
    report = redteam.run(api_url, issue_token("rt-nobody"), "no-such-department",
                         {"exfiltration": list(redteam.EXFILTRATION)})
    assert report.exit_code() == redteam.EXIT_UNTESTED
    assert report.errors[redteam.NOT_AUTHORISED] + sum(report.blocked.values()) == len(redteam.EXFILTRATION)
    assert report.errors[redteam.NOT_AUTHORISED] > 0


def test_an_unreachable_url_is_an_outage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It exited 2, a usage error, where `govrag ingest` says the same API not answering with 1: it is an outage as
    much as a typo, and nothing was tested, exit 3 (1 is a leak for `govrag redteam`: a monitor reading the exit code
    must not take an outage for one)."""
    assert _redteam("http://127.0.0.1:9", _corpus(tmp_path)) == redteam.EXIT_UNTESTED
    err = capsys.readouterr().err
    assert err == "cannot reach the API at http://127.0.0.1:9 (ConnectError); nothing was tested; check --url\n"


@pytest.mark.parametrize("stub_api", [[ANSWER]], indirect=True)
@pytest.mark.parametrize("userinfo", ["scanner:s3cret@", "scanner@", ":s3cret@", "@"])
def test_a_url_with_credentials_is_a_usage_error(stub_api: str, userinfo: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """httpx sent the URL's user name and password as an Authorization: Basic header in place of the bearer token
    (the password in clear over http; the probes refused 401), and the run went on; an empty one (`http://@host`:
    malformed) was taken as none. It is a bad argument, said without quoting it, exit 2, nothing sent."""
    with pytest.raises(SystemExit) as exited:
        _redteam(stub_api.replace("http://", f"http://{userinfo}"), _corpus(tmp_path))
    captured = capsys.readouterr()
    assert exited.value.code == redteam.EXIT_USAGE and captured.out == ""
    assert ("--url: must not hold a user name or password (user:password@): give the bearer token with --token or "
            "its environment variable (see --help)") in captured.err  # where it goes instead: the command's words
    assert "s3cret" not in captured.err and "scanner" not in captured.err


@pytest.mark.parametrize("port", ["99999", "0", "+80", "８０", ""])
def test_a_url_with_no_usable_port_is_a_usage_error(port: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A `--url` port that is not 1 to 65535 in ASCII digits was taken: httpx probed `:+80`, `:８０` or an empty
    `host:` on port 80 (another server than the one named), and `:99999` or `:0` ended the run as an API it could not
    reach. It is a bad argument, said without quoting the URL (it may hold a password), exit 2, nothing sent; and
    `redteam.run` called from Python refuses it by the same check, before its first probe."""
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(SystemExit) as exited:
        _redteam(url, _corpus(tmp_path))
    captured = capsys.readouterr()
    assert exited.value.code == redteam.EXIT_USAGE and captured.out == ""
    assert "--url: names a port that is not a number from 1 to 65535" in captured.err
    assert "127.0.0.1" not in captured.err
    with pytest.raises(http.UnusablePort):
        redteam.run(url, "t0ken", "hr", {"exfiltration": list(redteam.EXFILTRATION)})


@pytest.mark.parametrize(("userinfo", "scheme", "refusal"), [
    ("scanner:s3cret@", "http", "must not hold a user name or password (user:password@)"),
    (":s3cret@", "http", "must not hold a user name or password (user:password@)"),
    ("@", "http", "must not hold a user name or password (user:password@)"),
    ("", "ftp", "must be an http(s) URL"), ("scanner:s3cret@", "ftp", "must be an http(s) URL")])
def test_run_refuses_a_url_with_credentials_or_not_http_as_the_command_does(
        userinfo: str, scheme: str, refusal: str) -> None:
    """`redteam.run` called from Python, where no argparse checked the URL, raised the transport's CredentialsInURL
    ("a URL with a user name or password is refused") from inside its first probe, or took a URL that is no http(s)
    one for an API that does not answer (UnsupportedProtocol, httpx's). Now it refuses either before anything is
    sent, as `govrag redteam --url` does and in its words (one check for both), never quoting the URL."""
    received: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the http.server name)
            received.append(self.path)
            self.send_response(500)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"{scheme}://{userinfo}127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ValueError) as refused:  # http.URLRefused
            redteam.run(url, "t0ken", "hr", {"exfiltration": list(redteam.EXFILTRATION)})
    finally:
        server.shutdown()
        server.server_close()
    assert str(refused.value).startswith(refusal) and received == []
    assert isinstance(refused.value, http.CredentialsInURL) == refusal.startswith("must not hold")
    assert "s3cret" not in str(refused.value) and "scanner" not in str(refused.value)


def _answer(text: str, **more: str) -> Answer:
    """A 200 query answer saying `text` (with more fields)."""
    return 200, json.dumps({"answer": text, "citations": [], "refused": False, "reason": None, "request_id": "r",
                            **more}).encode()


LEAK = _answer("The marker is CNRY-0123456789abcdef.")
HUGE = _answer("The marker is CNRY-0123456789abcdef.", padding="x" * (redteam.MAX_RESPONSE_BYTES + 1))


@pytest.mark.parametrize("stub_api", [[ANSWER, HUGE, ANSWER]], indirect=True)
def test_a_body_over_the_cap_is_not_read(stub_api: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every response was read whole and scanned: a broken or hostile API (or a proxy) answering with a huge body
    made the run slow and big. Past MAX_RESPONSE_BYTES the body is left unread, never parsed (the canary in it is not
    found): that probe is an error, exit 3, and the run goes on."""
    assert _redteam(stub_api, _corpus(tmp_path), "--per-category", "1") == redteam.EXIT_UNTESTED
    out = capsys.readouterr().out
    assert f"  - HTTP 200 {redteam.OVER_CAP}: 1" in out and "answered: 6" in out and "leaks: 0" in out


@pytest.mark.parametrize("stub_api", [[ANSWER, ANSWER, (401, b'{"error": {"code": "unauthenticated"}}'), LEAK]],
                         indirect=True)
def test_a_token_refused_mid_run_stops_the_run(stub_api: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A token that expired mid-run: every later probe was still sent and counted as HTTP 401. The token will not
    come back, so the run stops there: what it tested is reported, and the rest was not sent (the leak the API would
    have given the fourth probe is never asked for), exit 3."""
    assert _redteam(stub_api, _corpus(tmp_path), "--per-category", "1") == redteam.EXIT_UNTESTED
    out = capsys.readouterr().out
    assert "answered: 2" in out and "  - HTTP 401: 1" in out and "leaks: 0" in out
    assert f"not sent: 4 ({redteam.SIGNED_OUT}; the run stopped)" in out


def _gzipped(status: int, make_body: Callable[[], bytes]) -> Callable[[BaseHTTPRequestHandler], None]:
    """An answer whose body (made when first sent) says it is gzip (Content-Encoding)."""

    def write(handler: BaseHTTPRequestHandler) -> None:
        body = make_body()
        handler.send_response(status)
        handler.send_header("Content-Encoding", "gzip")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return write


@functools.cache
def _gzip_bomb() -> bytes:
    """256 MiB of zero bytes, gzipped: 255 KiB."""
    deflate, block = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16), bytes(1 << 20)
    return b"".join(deflate.compress(block) for _ in range(256)) + deflate.flush()


@pytest.mark.parametrize("stub_api", [[_gzipped(200, _gzip_bomb)]], indirect=True)
def test_a_gzip_body_is_capped_as_it_inflates(stub_api: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The cap counted bytes as httpx decoded them, one network read at a time: a 64 KiB read of a gzip body
    inflated to 64 MiB in memory before the count passed 1 MiB. Now inflating stops one byte past the cap (256 MiB
    sent gzipped, 7 times: the run, its first connection's imports and TLS context included, holds a few MiB at
    most), the probe an error and the run goes on."""
    corpus, _ = _corpus(tmp_path), _gzip_bomb()  # made before the count starts: only the run's memory is counted
    tracemalloc.start()
    try:
        status = _redteam(stub_api, corpus, "--per-category", "1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == redteam.EXIT_UNTESTED
    assert f"  - HTTP 200 {redteam.OVER_CAP}: 7" in capsys.readouterr().out
    assert peak < 16 * redteam.MAX_RESPONSE_BYTES, f"{peak >> 20} MiB held at once"  # main: over 100 MiB


@pytest.mark.parametrize("stub_api", [[ANSWER, _gzipped(200, lambda: b"this is not gzip"),
                                       _gzipped(200, lambda: gzip.compress(ANSWER[1]))]], indirect=True)
def test_a_body_that_does_not_decode_is_a_probe_error(stub_api: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A body said to be gzip that is not (httpx.DecodingError) ended the run in a traceback, exit 1, read as a leak.
    It is a response that is not an answer: that probe an error, and the run goes on (a real gzip answer is read)."""
    assert _redteam(stub_api, _corpus(tmp_path), "--per-category", "1") == redteam.EXIT_UNTESTED
    out = capsys.readouterr().out
    assert f"  - HTTP 200 {redteam.NOT_DECODED}: 1" in out and "answered: 6" in out and "not sent" not in out


def _drip(headers_too: bool) -> Callable[[BaseHTTPRequestHandler], None]:
    """ANSWER sent a byte every 50 ms (about 6 s in all; its headers too, or at once), each read well inside httpx's
    read timeout."""

    def write(handler: BaseHTTPRequestHandler) -> None:
        status, body = ANSWER
        head = (f"HTTP/1.0 {status} OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        if not headers_too:
            handler.wfile.write(head)
        for byte in (head if headers_too else b"") + body:
            handler.wfile.write(bytes([byte]))
            time.sleep(0.05)

    return write


@pytest.mark.parametrize("stub_api", [[ANSWER, _drip(headers_too=False)], [ANSWER, _drip(headers_too=True)]],
                         indirect=True, ids=["its body", "its headers"])
def test_a_server_dripping_an_answer_is_cut_off_at_the_probe_deadline(stub_api: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The 120 s timeout was httpx's, per read: a server sending a byte at a time, each within it, held a probe (and
    the run) as long as it liked. The deadline is the whole probe's: past it the API is taken as gone, as when it
    stops answering (PROBE_SECONDS is shortened here; the server would answer in full after about 6 s, and the first
    probe, answered at once, has 2 s, room enough on a loaded machine for the first connection's set-up)."""
    monkeypatch.setattr(redteam, "PROBE_SECONDS", 2.0)
    assert _redteam(stub_api, _corpus(tmp_path), "--per-category", "1") == redteam.EXIT_UNTESTED
    out = capsys.readouterr().out
    assert "answered: 1" in out and "  - no answer (no complete response within 2 s): 1" in out
    assert "not sent: 5 (the API stopped answering; the run stopped)" in out


@pytest.mark.parametrize("stub_api", [[(401, b'{"error": {"code": "unauthenticated"}}'), LEAK]], indirect=True)
def test_a_token_refused_at_the_first_probe_is_a_usage_error(stub_api: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A 401 at the first probe was reported as a run that tested part of the corpus, exit 3; nothing was tested, and
    the token is the configuration to fix: one line saying so (never the token), exit 2, nothing more sent."""
    args = ["redteam", "--department", "hr", "--token", "s3cret-token", "--corpus", str(_corpus(tmp_path)),
            "--url", stub_api]
    assert cli.main(args) == redteam.EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"the API at {stub_api} refused the token (HTTP 401) at the first probe; nothing was tested; give a valid "
        "--token (or $GOVRAG_REDTEAM_TOKEN)\n")


_PROBES = {"exfiltration": list(redteam.EXFILTRATION), "probe": [f"ignore the rules, probe {i}" for i in range(5)]}
_PROBE_COUNT = sum(len(prompts) for prompts in _PROBES.values())


class _KeptAliveAPI:
    """A deployment answering every probe with ANSWER over HTTP/1.1 connections it keeps open, counting the
    connections it accepts and those ended; with `per_connection`, it closes a connection once it answered that many
    (`hang_up` "after the answer": at once, unannounced; "at the next probe": as the next request arrives, unanswered):
    outside the boundary, so a stub."""

    def __init__(self, per_connection: int | None = None, hang_up: str = "after the answer") -> None:
        self.accepted, self.ended, lock = 0, threading.Semaphore(0), threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.answered = 0
                with lock:
                    api.accepted += 1

            def finish(self) -> None:
                super().finish()
                api.ended.release()

            def do_POST(self) -> None:  # noqa: N802 (the http.server name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if per_connection is not None and hang_up == "at the next probe" and self.answered == per_connection:
                    self.close_connection = True
                    return
                _write_answer(self, ANSWER)
                self.answered += 1
                self.close_connection = per_connection is not None and hang_up == "after the answer" \
                    and self.answered == per_connection

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def all_ended(self) -> bool:
        """Whether every connection accepted has ended (waiting up to a minute for each: the server sees it close)."""
        return all(self.ended.acquire(timeout=60) for _ in range(self.accepted))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_run_keeps_one_connection_alive_and_closes_it_at_its_end() -> None:
    """Every probe opened a connection of its own (a new client each time): N probes, N connections set up and torn
    down. The run keeps one alive for all its probes (a new one only if the API closed it, or it sat idle past
    httpx's keep-alive expiry while a first probe's answer was scanned), and closes it at its end."""
    api = _KeptAliveAPI()
    try:
        report = redteam.run(api.url, "t0ken", "hr", _PROBES)
        assert report.answered == _PROBE_COUNT and not report.errors and not report.not_sent
        assert api.accepted < _PROBE_COUNT, f"{api.accepted} connections for {_PROBE_COUNT} probes"
        assert api.all_ended(), "a connection was left open after the run"
    finally:
        api.stop()


@pytest.mark.parametrize(("per_connection", "hang_up", "most_connections"), [
    (2, "at the next probe", _PROBE_COUNT - 1), (1, "after the answer", _PROBE_COUNT)],
    ids=["as the next probe arrives", "just after its answer"])
def test_an_api_closing_the_connection_between_probes_loses_no_probe(per_connection: int, hang_up: str,
                                                                     most_connections: int) -> None:
    """A kept-alive connection the API closes between probes (its keep-alive timeout) is opened again: a probe sent
    on it as it closed gets no response and is sent once more on a new connection, not counted as the API gone
    (which would stop the run); one closed before the next probe is not used. Every probe is answered."""
    api = _KeptAliveAPI(per_connection, hang_up)
    try:
        report = redteam.run(api.url, "t0ken", "hr", _PROBES)
        assert report.answered == _PROBE_COUNT and not report.errors and not report.not_sent
        assert api.accepted <= most_connections, f"{api.accepted} connections for {_PROBE_COUNT} probes"
        assert api.all_ended()
    finally:
        api.stop()
