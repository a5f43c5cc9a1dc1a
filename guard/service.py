"""The guard's decisions around a query: admission (kill switch, prompt firewall) before anything is searched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from core import metrics
from core.settings import Settings
from guard import controls
from guard.firewall import Verdict, get_firewall
from guard.schemas import KillMode

FIREWALL_REFUSAL = "This question was blocked by the prompt firewall."
# A question holding a chat template's control token (chat_template) is blocked however innocent ("what does ... mean
# in ChatML?"), and so is one whose reasoning tag goes on in the model's voice: say why and how to ask, without writing
# such a token (the answer may be passed to another model).
TEMPLATE_REFUSAL = (f"{FIREWALL_REFUSAL[:-1]}: it holds a chat template's control token (im_end, eot_id, INST, think "
                    "and the like, in their brackets), which would end your turn or the model's reasoning and open "
                    "another. To ask about one, name it without its brackets.")
DISABLED_MESSAGE = "Answering is switched off by an administrator (kill switch); try again later."


@dataclass
class Admission:
    """Whether a question may go on, under which kill-switch mode, and what the firewall said."""

    kill_mode: KillMode
    blocked_reason: str | None = None
    verdicts: dict[str, Any] = field(default_factory=dict)

    @property
    def disabled(self) -> bool:
        return self.kill_mode is KillMode.disabled


def admit(*, session: Session, settings: Settings, question: str, departments: list[str],
          vector: Sequence[float] | None = None) -> Admission:
    """Kill switch first, then the firewall in the strictest mode of the departments searched.

    `vector`: the question's embedding, which the caller computes for retrieval anyway (the firewall reads it)."""
    mode = controls.kill_mode(session=session, settings=settings, departments=departments)
    if mode is KillMode.disabled:
        return Admission(kill_mode=mode, blocked_reason="kill_switch_disabled")
    firewall_mode = controls.firewall_mode(session=session, settings=settings, departments=departments)
    result = get_firewall().inspect(question, firewall_mode, vector)
    verdicts: dict[str, Any] = {"firewall": {"mode": firewall_mode.value, "verdict": result.verdict.value,
                                             "score": round(result.score, 4), "rules": list(result.rules)}}
    admission = Admission(kill_mode=mode, verdicts=verdicts)
    if result.verdict is Verdict.block:
        admission.blocked_reason = "prompt_firewall"
        for department in departments or ["-"]:
            metrics.FIREWALL_BLOCKS.labels(department=department).inc()
        tripped = controls.record_guard_hit(session=session, settings=settings, departments=departments,
                                            kind="firewall")
        if tripped:
            verdicts["auto_trip"] = tripped
    elif result.verdict is Verdict.flag:
        metrics.GUARD_HITS.labels(kind="firewall_flag").inc()
    return admission


def refusal_text(admission: Admission) -> str:
    """What a blocked caller reads."""
    if admission.disabled:
        return DISABLED_MESSAGE
    return TEMPLATE_REFUSAL if "chat_template" in admission.verdicts["firewall"]["rules"] else FIREWALL_REFUSAL
