"""The model server allowlist: customer data cannot leave by misconfiguration."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_openai_backend_on_the_allowlist_starts() -> None:
    settings = Settings(answer_backend="openai", llm_base_url="http://vllm.internal:8000",
                        llm_allowed_hosts=["vllm.internal"])
    assert settings.llm_host_allowed


@pytest.mark.parametrize("url", ["https://api.openai.com", "http://127.0.0.1.evil.example:8000",
                                 "ftp://127.0.0.1/", "", "http://[::1:8080"])
def test_any_other_host_is_refused_at_start_up(url: str) -> None:
    with pytest.raises(ValidationError, match="ALLOWED_HOSTS"):
        Settings(answer_backend="openai", llm_base_url=url)


def test_llamacpp_needs_a_model_path() -> None:
    with pytest.raises(ValidationError, match="MODEL_PATH"):
        Settings(answer_backend="llamacpp")


@pytest.mark.parametrize(("setting", "value"), [("llm_max_answer_tokens", 0), ("llm_context_tokens", 0)])
def test_an_answer_or_a_window_of_no_tokens_is_refused(setting: str, value: int) -> None:
    """llama-cpp-python reads max_tokens 0 as no limit (an answer as long as the window allows), n_ctx 0 as the
    model's own window (not the one the prompt budget counts on)."""
    with pytest.raises(ValidationError, match=f"{setting}\n  Input should be greater than or equal to 1"):
        Settings(**{setting: value})


def test_an_answer_that_leaves_the_prompt_no_room_is_refused() -> None:
    with pytest.raises(ValidationError, match="GOVRAG_LLM_MAX_ANSWER_TOKENS must be less than GOVRAG_LLM_CONTEXT"):
        Settings(answer_backend="openai", llm_base_url="http://127.0.0.1:8080", llm_context_tokens=256,
                 llm_max_answer_tokens=256)
