"""Governed query vs an ungoverned baseline, in one run, over HTTP on loopback.

(a) baseline: bench/baseline_server.py — same embedder, plain vector search over plaintext, no auth, no audit.
(b) govrag: `govrag serve` on PostgreSQL with real tokens, Casbin, filtered search, re-check, decryption,
    extractive answer and a hash-chained audit row per query (kill switch `retrieval_only` when available).
Reports p50/p95/p99, throughput, errors at 1 and 8 clients, the (b)/(a) ratio, where govrag's time goes
(Server-Timing), and a bounded soak (fixed duration, loopback only): errors, server memory growth, audit rows
= requests; then queries at 1 client while a fail-closed re-index of one department runs (its documents are
withheld, their old points still in the collection until each run ends: the query searches past them), against the
same queries before it. Usage: python bench/query.py [--chunks 10000] [--requests 200] [--soak-seconds 120]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402

from bench.common import EVAL_DIR, ROOT, libpq_dsn, machine, percentile, read_jsonl, throwaway_postgres  # noqa: E402

DEPARTMENTS = ("hr", "finance", "legal", "engineering")
CHUNKS_PER_DOCUMENT = 20
CHUNK_CHARS = 300
MEMORY_BOUND_MIB = 100  # allowed server RSS growth over the soak (caches are bounded)
TOKEN_SECONDS = 7200  # the bench's tokens outlive its run, unless GOVRAG_TOKEN_MAX_LIFETIME_SECONDS is shorter
STOP_GRACE_SECONDS = 30  # a server stopped (SIGTERM) and still running after this is killed
REINDEX_TIMEOUT_SECONDS = 900  # the during-re-index section stops querying after this, the re-index unfinished
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def build_corpus(target_chunks: int) -> list[dict[str, str]]:
    """~300-character chunks of public eval text, spread over departments and documents."""
    texts = [row["text"] for row in read_jsonl(EVAL_DIR / "clapnq_rag_dev" / "corpus.jsonl")]
    texts += [row["text"] for row in read_jsonl(EVAL_DIR / "cranfield_ir" / "corpus.jsonl")]
    pieces = [piece for text in texts for piece in _pieces(text)]
    chunks = []
    for i in range(target_chunks):
        document = i // CHUNKS_PER_DOCUMENT
        chunks.append({"text": pieces[i % len(pieces)], "department": DEPARTMENTS[document % len(DEPARTMENTS)],
                       "document": f"doc-{document:05d}"})
    return chunks


def _pieces(text: str) -> list[str]:
    pieces, current = [], ""
    for sentence in _SENTENCE_END.split(text):
        if current and len(current) + len(sentence) > CHUNK_CHARS:
            pieces.append(current.strip())
            current = ""
        current += " " + sentence
    if current.strip():
        pieces.append(current.strip())
    return [p for p in pieces if len(p) > 40]


def questions() -> list[str]:
    """Real questions from the eval sets."""
    asked = [row["text"] for row in read_jsonl(EVAL_DIR / "clapnq_rag_dev" / "queries.jsonl")]
    return asked + [row["text"] for row in read_jsonl(EVAL_DIR / "cranfield_ir" / "queries.jsonl")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


class Governed:
    """A `govrag serve` process on its own PostgreSQL database (at `database_url`, empty) and data dir."""

    def __init__(self, workdir: Path, database_url: str) -> None:
        self.dsn = libpq_dsn(database_url)
        self.port, self.data_dir = free_port(), workdir / "govrag-data"
        env = {**os.environ, "GOVRAG_DATA_DIR": str(self.data_dir), "GOVRAG_ADMINS": '["bench-admin"]',
               "GOVRAG_DATABASE_URL": database_url,
               "GOVRAG_CHUNK_MAX_CHARS": str(CHUNK_CHARS + 20), "GOVRAG_BROKER_URL": "memory://",
               "GOVRAG_SERVER_TIMING": "true"}
        command = [sys.executable, "-m", "api.cli", "serve", "--port", str(self.port)]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env,  # noqa: S603
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            wait_http(f"{self.url}/healthz")
        except BaseException:  # it never started, or Ctrl-C: no server left behind
            self.close()
            raise
        from authz.dev_issuer import DevIssuer
        from core.settings import Settings

        # the server's own settings (this environment, its data dir): its issuer, audience and longest token lifetime
        issuer = DevIssuer.from_settings(Settings(data_dir=self.data_dir))
        ttl = min(TOKEN_SECONDS, issuer.max_ttl_seconds)
        self.admin = issuer.issue("bench-admin", [], ttl_seconds=ttl)
        self.user = issuer.issue("bench-user", ["bench-staff"], ttl_seconds=ttl)

    def headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def load(self, chunks: list[dict[str, str]]) -> float:
        """Departments, roles, and one upload per document; returns ingestion seconds."""
        with httpx.Client(base_url=self.url, headers=self.headers(self.admin), timeout=60) as admin:
            for department in DEPARTMENTS:
                admin.post("/v1/admin/departments", json={"name": department}).raise_for_status()
                for role in ("editor", "reader"):
                    admin.post("/v1/admin/role-assignments", json={
                        "subject": "group:bench-staff", "role": role, "department": department}).raise_for_status()
            admin.post("/v1/admin/kill-switch", json={"scope": "global", "mode": "retrieval_only",
                                                       "reason": "benchmark: no model call"})
        documents: dict[tuple[str, str], list[str]] = defaultdict(list)
        for chunk in chunks:
            documents[(chunk["department"], chunk["document"])].append(chunk["text"])
        started = time.perf_counter()
        with httpx.Client(base_url=self.url, headers=self.headers(self.user), timeout=120) as client:
            jobs = [client.post("/v1/documents", data={"department": dept, "title": doc},
                                files={"file": (f"{doc}.md", "\n\n".join(texts).encode())}).json()["job_id"]
                    for (dept, doc), texts in documents.items()]
            for job in jobs:
                while client.get(f"/v1/jobs/{job}").json()["status"] not in ("ready", "failed"):
                    time.sleep(0.5)
        return time.perf_counter() - started

    def audit_rows(self) -> int:
        return self._count("SELECT count(*) FROM retrieval_events WHERE event_type = 'retrieval'")

    def unfinished(self, department: str) -> int:
        """The department's documents still queued or being ingested."""
        return self._count("SELECT count(*) FROM documents WHERE department = %s AND status IN ('queued', "
                           "'processing')", department)

    def withheld(self, department: str) -> int:
        """The department's documents a fail-closed re-index withheld and no run has served again."""
        return self._count("SELECT count(*) FROM documents WHERE department = %s AND withheld", department)

    def _count(self, sql: str, *parameters: str) -> int:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(sql, parameters).fetchone()  # type: ignore[arg-type]
            return int(row[0]) if row else 0

    def close(self) -> None:
        stop(self.process)


def start_baseline(corpus_file: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The ungoverned baseline server on `corpus_file`, its shard in `workdir`, and its URL once it answers."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "baseline_server.py"), str(corpus_file),  # noqa: S603
                                str(port), str(workdir / "baseline-shard")], cwd=ROOT, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz")
    except BaseException:  # it never started, or Ctrl-C: no server left behind
        stop(process)
        raise
    return process, url


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a server (SIGTERM) and wait for its end: only then may the directory it writes in be removed. One still
    running after STOP_GRACE_SECONDS, or when a Ctrl-C ends the wait, is killed: never a server left behind."""
    try:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_GRACE_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


async def run_load(url: str, headers: dict[str, str], body_for, total: int, clients: int,  # type: ignore[no-untyped-def]
                   deadline: float | None = None) -> dict[str, object]:
    """`clients` concurrent loops sharing `total` requests (or until `deadline`); latencies and stage timings."""
    latencies: list[float] = []
    stages: dict[str, list[float]] = defaultdict(list)
    errors, counter = 0, iter(range(total))

    async def loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            if deadline is not None and time.monotonic() > deadline:
                return
            started = time.perf_counter()
            try:
                response = await client.post(url, json=body_for(i), headers=headers)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok, response = False, None
            latencies.append(time.perf_counter() - started)
            errors += not ok
            for name, value in _server_timing(response):
                stages[name].append(value)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(loop(client) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "throughput": len(latencies) / elapsed, "stages": stages}


def _server_timing(response: httpx.Response | None) -> list[tuple[str, float]]:
    if response is None:
        return []
    found = []
    for item in response.headers.get("server-timing", "").split(","):
        match = re.match(r"\s*([\w-]+);dur=([\d.]+)", item)
        if match:
            found.append((match.group(1), float(match.group(2))))
    return found


def summary(name: str, clients: int, result: dict) -> str:  # type: ignore[type-arg]
    ms = [x * 1000 for x in result["latencies"]]
    return (f"| {name} | {clients} | {percentile(ms, 50):.1f} | {percentile(ms, 95):.1f} | {percentile(ms, 99):.1f} "
            f"| {result['throughput']:.1f} | {result['errors']} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--soak-seconds", type=int, default=120)
    args = parser.parse_args()
    asked = questions()
    with tempfile.TemporaryDirectory() as directory, throwaway_postgres("govrag_bench_query") as database_url:
        workdir = Path(directory)
        chunks = build_corpus(args.chunks)
        corpus_file = workdir / "corpus.jsonl"
        corpus_file.write_text("".join(json.dumps(c) + "\n" for c in chunks))
        governed = Governed(workdir, database_url)
        baseline = None
        try:
            ingest_seconds = governed.load(chunks)
            baseline, baseline_url = start_baseline(corpus_file, workdir)
            report(args, asked, governed, baseline_url, len(chunks), ingest_seconds)
        finally:  # both ended before their directory is removed
            try:
                if baseline is not None:
                    stop(baseline)
            finally:
                governed.close()


def report(args, asked: list[str], governed: Governed, baseline_url: str, chunk_count: int,  # type: ignore[no-untyped-def]
           ingest_seconds: float) -> None:
    print(f"# Query latency: govrag vs ungoverned baseline ({machine()})\n")
    print(f"{chunk_count} chunks in {len(DEPARTMENTS)} departments; ingestion through the API took "
          f"{ingest_seconds:.0f} s ({chunk_count / ingest_seconds:.0f} chunks/s).\n")
    print("| system | clients | p50 ms | p95 ms | p99 ms | req/s | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    before = governed.audit_rows()
    sent, results = 0, {}
    for clients in (1, 8):
        total = args.requests * (1 if clients == 1 else 2)
        base = asyncio.run(run_load(f"{baseline_url}/search", {}, lambda i: {"question": asked[i % len(asked)]},
                                    total, clients))
        gov = asyncio.run(run_load(f"{governed.url}/v1/query", governed.headers(governed.user),
                                   lambda i: {"question": asked[i % len(asked)], "purpose": "bench"}, total, clients))
        sent += len(gov["latencies"])
        results[clients] = (base, gov)
        print(summary("baseline (ungoverned)", clients, base))
        print(summary("govrag /v1/query", clients, gov))
    print()
    for clients, (base, gov) in results.items():
        b50, g50 = percentile(base["latencies"], 50), percentile(gov["latencies"], 50)
        b95, g95 = percentile(base["latencies"], 95), percentile(gov["latencies"], 95)
        print(f"- ratio govrag/baseline at {clients} client(s): p50 {g50 / b50:.2f}, p95 {g95 / b95:.2f}")
    stages = results[1][1]["stages"]
    if stages:
        print("\nWhere govrag's time goes (1 client, mean ms per query, from Server-Timing):\n")
        for name, values in sorted(stages.items(), key=lambda kv: -sum(kv[1])):
            print(f"- {name}: {sum(values) / len(values):.1f}")
    if args.soak_seconds > 0:
        soak(args, asked, governed, before + sent)
    during_reindex(args, asked, governed)


def soak(args, asked: list[str], governed: Governed, expected_before: int) -> None:  # type: ignore[no-untyped-def]
    """Fixed-duration load at 16 and 32 clients: errors, memory growth, audit rows = requests."""
    process = psutil.Process(governed.process.pid)
    print(f"\nSoak ({args.soak_seconds} s per level, loopback only):\n")
    print("| clients | requests | errors | req/s | p95 ms | server RSS start → end MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    expected, first_rss, rss_end = expected_before, process.memory_info().rss / 2**20, 0.0
    for clients in (16, 32):
        rss_start = process.memory_info().rss / 2**20
        result = asyncio.run(run_load(f"{governed.url}/v1/query", governed.headers(governed.user),
                                      lambda i: {"question": asked[i % len(asked)], "purpose": "soak"},
                                      10**9, clients, deadline=time.monotonic() + args.soak_seconds))
        expected += len(result["latencies"])
        rss_end = process.memory_info().rss / 2**20
        print(f"| {clients} | {len(result['latencies'])} | {result['errors']} | {result['throughput']:.1f} | "
              f"{percentile([x * 1000 for x in result['latencies']], 95):.1f} | {rss_start:.0f} → {rss_end:.0f} |")
    rows = _settled(governed.audit_rows)
    growth = rss_end - first_rss
    print(f"\nServer memory growth over the soak: {growth:.0f} MiB (bound {MEMORY_BOUND_MIB} MiB): "
          f"{'OK' if growth <= MEMORY_BOUND_MIB else 'EXCEEDED'}")
    print(f"Audit rows {rows} for {expected} governed requests sent: {'OK' if rows == expected else 'MISMATCH'}")


def during_reindex(args, asked: list[str], governed: Governed) -> None:  # type: ignore[no-untyped-def]
    """1 client before and while a fail-closed re-index of the first department runs in the server's in-process
    queue: latency, the search stage (widened while withheld points are dropped), citations per answer, refusals."""
    department = DEPARTMENTS[0]
    before = _sequential(governed, asked, args.requests)
    with httpx.Client(base_url=governed.url, headers=governed.headers(governed.admin), timeout=60) as admin:
        queued = admin.post("/v1/admin/reindex", json={"department": department})
        queued.raise_for_status()
    started = time.monotonic()
    during = _sequential(governed, asked, 10**9, until=lambda: governed.unfinished(department) == 0,
                         deadline=started + REINDEX_TIMEOUT_SECONDS)
    took = time.monotonic() - started
    print(f"\nDuring a fail-closed re-index of `{department}` ({len(queued.json()['queued'])} documents, "
          f"{took:.0f} s; 1 client, every department readable):\n")
    print("| when | queries | p50 ms | p95 ms | search ms (mean) | citations per answer | refused | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, result in (("before", before), ("during", during)):
        ms = [x * 1000 for x in result["latencies"]]
        search = result["stages"].get("search", [0.0])
        print(f"| {name} | {len(ms)} | {percentile(ms, 50):.1f} | {percentile(ms, 95):.1f} | "
              f"{sum(search) / len(search):.1f} | {sum(result['citations']) / max(len(ms), 1):.2f} | "
              f"{result['refused']} | {result['errors']} |")
    left = governed.unfinished(department)
    print(f"\nDocuments of `{department}` still being re-indexed at the end: {left}"
          f"{' (timed out)' if left else ''}; withheld documents left unserved: {governed.withheld(department)}")


def _sequential(governed: Governed, asked: list[str], total: int, *, until=None,  # type: ignore[no-untyped-def]
                deadline: float | None = None) -> dict:  # type: ignore[type-arg]
    """One client's queries, in order: latencies, Server-Timing stages, citations per answer, refusals, errors;
    stops after `total`, once `until()` holds (checked every 10 queries) or at `deadline`."""
    result: dict = {"latencies": [], "stages": defaultdict(list), "citations": [], "refused": 0,  # type: ignore[type-arg]
                    "errors": 0}
    with httpx.Client(base_url=governed.url, headers=governed.headers(governed.user), timeout=60) as client:
        for i in range(total):
            if (until is not None and i % 10 == 0 and until()) or (deadline and time.monotonic() > deadline):
                break
            started = time.perf_counter()
            response = client.post("/v1/query", json={"question": asked[i % len(asked)], "purpose": "bench"})
            result["latencies"].append(time.perf_counter() - started)
            if response.status_code != 200:
                result["errors"] += 1
                continue
            body = response.json()
            result["citations"].append(len(body["citations"]))
            result["refused"] += bool(body["refused"])
            for name, value in _server_timing(response):
                result["stages"][name].append(value)
    return result


def _settled(read, quiet_seconds: float = 3.0, timeout: float = 120.0) -> int:  # type: ignore[no-untyped-def]
    """A count once it has stopped changing (requests a client gave up on may still finish server-side)."""
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        value = read()
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= quiet_seconds:
            return int(value)
        time.sleep(0.5)
    return int(last)


if __name__ == "__main__":
    main()
