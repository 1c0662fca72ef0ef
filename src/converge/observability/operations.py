"""The operators' dashboards: the controller and workers (GPUs included), and cost and engines
(see `dashboards.py` for the traffic-side ones and the rules every dashboard follows)."""

from __future__ import annotations

from converge.observability.grafana import Dashboard, Row, Target, Threshold, Unit
from converge.observability.panels import (
    DEPLOYMENT,
    JOB,
    RATE,
    D,
    J,
    line,
    quantile,
    rate,
)


def workers() -> Dashboard:
    reconcile = "converge_reconcile_duration_seconds"
    controller = Row(
        "Controller",
        (
            line(
                "Leader by role",
                Target(f"max by (role, instance) (converge_leader{{{J}}})", "{{role}} {{instance}}"),
                description="1 on the process holding the role's lock, 0 on those standing by",
                minimum=0,
                maximum=1,
            ),
            line(
                "Reconcile duration",
                *(Target(quantile(q, reconcile, J), f"p{q * 100:g}") for q in (0.5, 0.95, 0.99)),
                description="One deployment: read, apply, observe, status",
                unit=Unit.SECONDS,
            ),
            line(
                "Reconciles and errors",
                Target(rate(f"{reconcile}_count", J), "reconciles"),
                Target(rate("converge_reconcile_errors_total", J), "errors"),
                unit=Unit.PER_SECOND,
            ),
            line(
                "Replicas by phase",
                Target(f"sum by (phase) (converge_replicas{{{J}}})", "{{phase}}"),
                description="Across deployments, as the runtime observes them",
                stacked=True,
            ),
            line(
                "Replica restarts by deployment",
                Target(
                    f"sum by (deployment) (increase(converge_replica_restarts_total{{{J}}}[{RATE}]))",
                    "{{deployment}}",
                ),
                description="Restarts in the interval per deployment: replicas that crashed and were restarted",
                width=24,
            ),
        ),
    )
    build = "converge_build_duration_seconds"
    builds = Row(
        "Builds",
        (
            line(
                "Finished builds by outcome",
                Target(
                    f"sum by (outcome) (increase({build}_count{{{J}}}[{RATE}])) or vector(0)", "{{outcome}}"
                ),
                description="Succeeded, failed, cancelled",
                stacked=True,
            ),
            line(
                "Build duration p50 and p95 by server",
                *(
                    Target(quantile(q, build, J, by="server"), f"{{{{server}}}} p{q * 100:g}")
                    for q in (0.5, 0.95)
                ),
                description="From start to finish: fetch, smoke-load, benchmark",
                unit=Unit.SECONDS,
            ),
        ),
    )
    ingest = "converge_ingestion_job_duration_seconds"
    ingestion = Row(
        "Ingestion",
        (
            line(
                "Finished ingestion jobs by outcome",
                Target(
                    f"sum by (outcome) (increase({ingest}_count{{{J}}}[{RATE}])) or vector(0)", "{{outcome}}"
                ),
                stacked=True,
            ),
            line(
                "Ingestion job duration p95",
                Target(quantile(0.95, ingest, J), "p95"),
                unit=Unit.SECONDS,
            ),
            line(
                "Chunks embedded per second",
                Target(rate("converge_ingestion_chunks_embedded_total", J) + " or vector(0)", "chunks"),
                unit=Unit.PER_SECOND,
                width=24,
            ),
        ),
    )
    gpus = Row(
        "GPUs",
        (
            line(
                "GPU memory used",
                Target(
                    f"converge_gpu_memory_used_bytes{{{J}}} / converge_gpu_memory_total_bytes{{{J}}}",
                    "{{instance}} GPU {{gpu}} {{profile}}",
                ),
                description="Per GPU and MIG slice; no data where there is no GPU (or no NVML)",
                unit=Unit.RATIO,
                minimum=0,
                maximum=1,
                thresholds=(Threshold(None, "green"), Threshold(0.95, "red")),
            ),
            line(
                "GPU memory",
                Target(f"converge_gpu_memory_used_bytes{{{J}}}", "{{instance}} GPU {{gpu}} {{profile}} used"),
                Target(
                    f"converge_gpu_memory_total_bytes{{{J}}}", "{{instance}} GPU {{gpu}} {{profile}} total"
                ),
                unit=Unit.BYTES,
            ),
            line(
                "GPU utilisation",
                Target(f"converge_gpu_utilization_ratio{{{J}}}", "{{instance}} GPU {{gpu}}"),
                description="Share of time a kernel ran; NVML reports none for MIG slices",
                unit=Unit.RATIO,
                minimum=0,
                maximum=1,
                width=24,
            ),
        ),
    )
    return Dashboard(
        uid="converge-workers",
        title="Converge / Controller and workers",
        description="The controller's reconciles and leadership, replicas, builds, ingestion and GPUs",
        variables=(JOB,),
        rows=(controller, builds, ingestion, gpus),
    )


def cost() -> Dashboard:
    """Money and capacity per deployment: measured cost, budgets, what the engines hold."""
    spent = f"converge_deployment_cost_today{{{J}, {D}}}"
    tokens_today = f"sum by (deployment) (increase(converge_gateway_tokens_total{{{J}, {D}}}[1d]))"
    money = Row(
        "Cost",
        (
            line(
                "Measured cost today by deployment",
                Target(f"max by (deployment) ({spent})", "{{deployment}}"),
                description="Replica-seconds today (UTC) x the price catalogue, in its currency; the cost meter's",
                stacked=True,
            ),
            line(
                "Cost per million tokens, last 24 h",
                Target(f"max by (deployment) ({spent}) / ({tokens_today} > 0) * 1e6", "{{deployment}}"),
                description="Today's measured cost over the tokens the gateway metered in the last day",
            ),
            line(
                "Monthly budget used by project",
                Target("max by (project) (converge_project_budget_used_ratio{" + J + "})", "{{project}}"),
                description="Measured cost this month over the budget; alerts at 80% and 100%",
                unit=Unit.RATIO,
                thresholds=(Threshold(None, "green"), Threshold(0.8, "orange"), Threshold(1, "red")),
                width=24,
            ),
        ),
    )
    engines = Row(
        "Engines (where they report it: llama.cpp)",
        (
            line(
                "Slots busy and total",
                Target(
                    f"sum by (deployment, state) (converge_engine_slots{{{J}, {D}}})",
                    "{{deployment}} {{state}}",
                ),
                description="Parallel sequences of the ready replicas: busy ones decode, the rest wait for work",
            ),
            line(
                "KV cache use (fullest replica)",
                Target(
                    f"max by (deployment) (converge_engine_kv_cache_usage_ratio{{{J}, {D}}})",
                    "{{deployment}}",
                ),
                unit=Unit.RATIO,
                thresholds=(Threshold(None, "green"), Threshold(0.9, "orange")),
            ),
            line(
                "Engine tokens per second",
                Target(
                    rate("converge_engine_tokens_total", J, D, by="deployment, kind"),
                    "{{deployment}} {{kind}}",
                ),
                description="Generated, prompt and prompt served from the KV cache, as the engines count them",
                unit=Unit.PER_SECOND,
            ),
            line(
                "Inter-token latency (streaming)",
                *(
                    Target(quantile(q, "converge_gateway_inter_token_latency_seconds", J, D), f"p{q * 100:g}")
                    for q in (0.5, 0.95)
                ),
                description="The mean gap between tokens after the first, one observation per stream",
                unit=Unit.SECONDS,
            ),
        ),
    )
    return Dashboard(
        uid="converge-cost",
        title="Converge / Cost and engines",
        description="Measured cost per deployment, budgets, and what the inference engines hold",
        variables=(JOB, DEPLOYMENT),
        rows=(money, engines),
    )
