"""The model-version lifecycle: the only place that says which state may follow which."""

from __future__ import annotations

from enum import StrEnum


class VersionState(StrEnum):
    REGISTERED = "registered"
    SCANNING = "scanning"
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    REJECTED = "rejected"
    DEPRECATED = "deprecated"
    REVOKED = "revoked"


S = VersionState
TRANSITIONS: dict[VersionState, frozenset[VersionState]] = {
    S.REGISTERED: frozenset({S.SCANNING}),
    S.SCANNING: frozenset({S.PENDING_APPROVAL, S.REJECTED}),
    S.PENDING_APPROVAL: frozenset({S.APPROVED, S.REJECTED, S.REVOKED}),
    S.APPROVED: frozenset({S.DEPRECATED, S.REVOKED}),
    S.DEPRECATED: frozenset({S.APPROVED, S.REVOKED}),
    S.REJECTED: frozenset(),
    S.REVOKED: frozenset(),
}
# States in which a version may be deployed.
SERVABLE = frozenset({S.APPROVED, S.DEPRECATED})


class InvalidTransition(ValueError):
    def __init__(self, current: VersionState, target: VersionState) -> None:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none (final state)"
        super().__init__(f"A version in state '{current}' cannot become '{target}'; allowed: {allowed}")
        self.current, self.target = current, target


def transition(current: VersionState | str, target: VersionState | str) -> VersionState:
    cur, tgt = VersionState(current), VersionState(target)
    if tgt not in TRANSITIONS[cur]:
        raise InvalidTransition(cur, tgt)
    return tgt
