"""What a build Job and its pod report, read as a build's progress (pure: objects in, records out).

A build Job (`manifests.render_build`) runs its steps as containers: fetch, verify and scan as
init containers, the target server as a native sidecar (`smoke-load`, an init container with
`restartPolicy: Always` whose startup probe is the smoke-load), the benchmark as the main
container. Each step ends with one JSON line (`workers/steps.py`), which the kubelet keeps as the
container's termination message: the step's result file, or the tail of its log when it failed
without writing one (`terminationMessagePolicy: FallbackToLogsOnError`).

`read_job` decides, level-triggered from whatever the API holds now:
- succeeded: the Job controller's `Complete` condition, with the benchmark's figures;
- failed: the first step whose container ended with a non-zero exit code (its message), a
  smoke-load server that exited before the benchmark ended, a container that cannot start
  (its image cannot be pulled, a Secret it reads is missing), or the Job's `Failed` condition
  (deadline exceeded) when no step says more;
- otherwise running, with each step's phase for the build's log.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Manifest = dict[str, Any]

SMOKE_LOAD = "smoke-load"
BENCHMARK = "benchmark"
# Waiting reasons that do not go away by waiting: a build fails on them at once, with the reason,
# rather than at its deadline an hour later.
CANNOT_START = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)


@dataclass(frozen=True, kw_only=True)
class JobReading:
    finished: bool
    succeeded: bool = False
    step: str | None = None  # the step that failed
    message: str = ""  # why it failed, in the step's own words where it said
    results: dict[str, Any] | None = None  # the benchmark's figures (None: read its log)
    phases: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (step, phase) in order

    @property
    def reason(self) -> str:
        """The build's reason, as the local runner words it: the failing step, then its message."""
        return f"{self.step}: {self.message}" if self.step else self.message


def _condition(obj: Mapping[str, Any], type_: str) -> Manifest | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def _statuses(pod: Mapping[str, Any]) -> list[tuple[Manifest, Manifest]]:
    """(container spec, its status) for every step in the order the pod runs them."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    seen = {s.get("name"): s for s in (status.get("initContainerStatuses") or [])}
    seen |= {s.get("name"): s for s in (status.get("containerStatuses") or [])}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    return [(c, seen.get(c["name"]) or {}) for c in containers]


def _sidecar(container: Mapping[str, Any]) -> bool:
    return container.get("restartPolicy") == "Always"


def _phase(container: Mapping[str, Any], status: Mapping[str, Any]) -> str:
    state = status.get("state") or {}
    if "terminated" in state:
        return "done" if state["terminated"].get("exitCode") == 0 else "failed"
    if "running" in state:
        if _sidecar(container):
            return "ready" if status.get("started") or status.get("ready") else "loading"
        return "running"
    return "waiting"


def step_message(text: str | None) -> str:
    """A step's own words from its termination message: the `error` of its last JSON line, else
    its last line (a step that crashed before it could say more)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    for line in reversed(lines):
        record = _json(line)
        if record is not None and record.get("error"):
            return str(record["error"])
    return lines[-1] if lines else ""


def step_result(text: str | None) -> dict[str, Any] | None:
    """The JSON result line of a step that succeeded, or None where there is none whole."""
    for line in reversed((text or "").splitlines()):
        record = _json(line.strip())
        if record is not None and record.get("ok") is True:
            return record
    return None


def _json(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _exit(terminated: Mapping[str, Any]) -> str:
    code = terminated.get("exitCode")
    reason = terminated.get("reason")
    return f"exited with code {code}" + (
        f" ({reason})" if reason and reason not in ("Error", "Completed") else ""
    )


def _step_failure(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    statuses = _statuses(pod)
    main_done = any(
        "terminated" in (status.get("state") or {}) for c, status in statuses if c["name"] == BENCHMARK
    )
    for container, status in statuses:
        name = container["name"]
        state = status.get("state") or {}
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in CANNOT_START:
            return name, f"cannot start: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
        if _sidecar(container):
            if main_done:
                continue  # the kubelet stops the server once the benchmark has ended
            ended = state.get("terminated") or (status.get("lastState") or {}).get("terminated")
            if ended is not None:
                said = step_message(ended.get("message"))
                why = f"the server {_exit(ended)} before the benchmark ended"
                return name, f"{why}: {said}" if said else why
            continue
        terminated = state.get("terminated")
        if terminated is not None and terminated.get("exitCode") != 0:
            return name, step_message(terminated.get("message")) or _exit(terminated)
    return None


def benchmark_results(text: str | None) -> dict[str, Any] | None:
    record = step_result(text)
    results = record.get("results") if record is not None else None
    return results if isinstance(results, dict) else None


def benchmark_output(pod: Mapping[str, Any]) -> str | None:
    """The benchmark container's termination message, once it has ended."""
    for container, status in _statuses(pod):
        if container["name"] == BENCHMARK:
            terminated = (status.get("state") or {}).get("terminated")
            return terminated.get("message", "") if terminated is not None else None
    return None


def phases(pod: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    if pod is None:
        return ()
    return tuple((c["name"], _phase(c, s)) for c, s in _statuses(pod))


def read_job(job: Mapping[str, Any], pod: Mapping[str, Any] | None) -> JobReading:
    steps = phases(pod)
    failure = _step_failure(pod) if pod is not None else None
    if failure is not None:
        return JobReading(finished=True, step=failure[0], message=failure[1], phases=steps)
    if _condition(job, "Complete") is not None:
        if pod is None:
            return JobReading(finished=True, message="the build's pod is gone: its results cannot be read")
        # None when the message does not hold them whole: the runner reads the log instead.
        results = benchmark_results(benchmark_output(pod))
        return JobReading(finished=True, succeeded=True, results=results, phases=steps)
    failed = _condition(job, "Failed")
    if failed is not None:
        return JobReading(finished=True, message=_job_failure(job, failed), phases=steps)
    if pod is not None and (pod.get("status") or {}).get("phase") == "Failed":
        status = pod["status"]
        message = status.get("message") or status.get("reason") or "the build's pod failed"
        return JobReading(finished=True, message=str(message), phases=steps)
    return JobReading(finished=False, phases=steps)


def _job_failure(job: Mapping[str, Any], condition: Mapping[str, Any]) -> str:
    reason = condition.get("reason") or "Failed"
    if reason == "DeadlineExceeded":
        deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
        return f"the build did not finish within {deadline}s (DeadlineExceeded)"
    message = condition.get("message")
    return f"{reason}: {message}" if message else str(reason)


def newest_pod(pods: Sequence[Mapping[str, Any]]) -> Manifest | None:
    """The Job's current pod (a replaced one, e.g. after an eviction, is newer)."""
    if not pods:
        return None
    newest = max(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
    return dict(newest)
