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
                                 "ftp://127.0.0.1/", "", "http://user@api.example.com"])
def test_any_other_host_is_refused_at_start_up(url: str) -> None:
    with pytest.raises(ValidationError, match="ALLOWED_HOSTS"):
        Settings(answer_backend="openai", llm_base_url=url)


def test_llamacpp_needs_a_model_path() -> None:
    with pytest.raises(ValidationError, match="MODEL_PATH"):
        Settings(answer_backend="llamacpp")
