"""Who is calling: the verified subject, its groups and whether it administers the platform."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from core.text import VARIATION_SELECTOR

GROUP_PREFIX = "group:"
ROLE_PREFIX = "role:"
SYSTEM_PREFIX = "system:"  # the platform's own actions in the ledger (an automatic kill-switch trip)
CLI_PREFIX = "cli:"  # an operator's server-side command in the ledger (`govrag audit`, `govrag ingest`)
# No token subject may start with these: a caller must never pass for a group, a role or the ledger's own actors.
RESERVED_PREFIXES = (GROUP_PREFIX, ROLE_PREFIX, SYSTEM_PREFIX, CLI_PREFIX)
MAX_SUBJECT_CHARS = 255  # longest subject (a token's `sub`, a user or group:<name> in the policy), in characters


def token_can_carry(name: str) -> bool:
    """Whether a token's subject or groups claim may hold `name`: printable characters only. A control, format or
    other invisible character (a zero-width space, a direction mark, a Unicode tag character; a variation selector,
    which `isprintable` passes) or a lone surrogate is refused: it would break an audit row, or show as a name it is
    not (`nadia` and `nadia` with selectors after it, which may spell a hidden text, look alike)."""
    return name.isprintable() and not VARIATION_SELECTOR.search(name)


@dataclass(frozen=True)
class Identity:
    """A caller proven by a verified token; never built from unverified input."""

    subject: str
    groups: tuple[str, ...]
    is_platform_admin: bool
    email: str | None = None

    @property
    def subjects(self) -> tuple[str, ...]:
        """Every principal this caller acts as: its subject, then one "group:<name>" per group."""
        return (self.subject, *(GROUP_PREFIX + group for group in self.groups))


def is_platform_admin(subject: str, groups: Iterable[str], admins: list[str]) -> bool:
    """True if an admins entry names the subject, or "group:<name>" names one of its groups."""
    group_set = set(groups)
    for entry in admins:
        if entry.startswith(GROUP_PREFIX):
            if entry[len(GROUP_PREFIX) :] in group_set:
                return True
        elif entry == subject:
            return True
    return False


def operator_identity(actor: str) -> Identity:
    """An operator running a server-side command (`govrag audit`, `govrag ingest`): a platform admin, named in the
    ledger as cli:<actor>."""
    return Identity(subject=f"{CLI_PREFIX}{actor}", groups=(), is_platform_admin=True)
