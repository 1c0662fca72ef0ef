"""`converge render ...`: print manifests, without talking to a server or a cluster."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from converge.cli.output import die
from converge.kit.roles import Role

render = typer.Typer(
    help="Print Kubernetes manifests (for `kubectl apply -f -` or Terraform) and Grafana dashboards;"
    " talks to nothing.",
    no_args_is_help=True,
)


class Format(StrEnum):
    YAML = "yaml"
    JSON = "json"


PLATFORM_HELP = """Print the manifests that run Converge itself on a Kubernetes cluster.

One Deployment per role (api, gateway, controller, worker) with its ServiceAccount, Services for the API and the gateway, PodDisruptionBudgets, NetworkPolicies, a ConfigMap of settings, the least RBAC each role needs (the controller: what it applies in project namespaces; the API: read-only access to nodes, pods and workloads; the gateway and the workers: none) and Converge's CRDs.

The secrets are not printed. Create them in the namespace first (bootstrap-token is optional: the first admin key, if you choose it):

  kubectl create namespace converge
  kubectl -n converge create secret generic converge \\
    --from-literal=database-url=postgresql://USER:PASSWORD@HOST:5432/converge \\
    --from-literal=auth-secret-key=$(openssl rand -hex 32)

Then apply them (server-side apply, as Converge applies its own objects):

  converge render platform | kubectl apply --server-side -f -
"""


@render.command("platform", help=PLATFORM_HELP)
def platform(  # typer passes every option by name
    *,
    namespace: Annotated[
        str, typer.Option("--namespace", "-n", help="Where Converge runs (its system namespace)")
    ] = "converge",
    image: Annotated[str | None, typer.Option(help="The Converge image; default: this release's")] = None,
    replicas: Annotated[
        list[str] | None,
        typer.Option(
            help="ROLE=N, repeatable; default: api=2 gateway=2 controller=2 worker=1. Every role may "
            "run several replicas (the controller's stand by to take over)",
            metavar="ROLE=N",
        ),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="CONVERGE_KEY=VALUE for the ConfigMap, repeatable (e.g. "
            "CONVERGE_LIBRARY__ARTIFACT_STORE_URL=s3://bucket/prefix)",
            metavar="KEY=VALUE",
        ),
    ] = None,
    secret: Annotated[
        str,
        typer.Option(help="The Secret holding database-url, auth-secret-key and optionally bootstrap-token"),
    ] = "converge",
    output: Annotated[
        Format, typer.Option("--output", "-o", help="yaml: a document stream; json: a v1 List")
    ] = Format.YAML,
) -> None:
    from converge.runtime.kubernetes.config import KubernetesConfig
    from converge.runtime.kubernetes.platform import PlatformSpec, render_platform

    try:
        cluster = KubernetesConfig(system_namespace=namespace).cluster_profile(kserve=False)
        spec = PlatformSpec(
            cluster=cluster,
            image=image,
            replicas=_replicas(replicas or []),
            settings=_pairs(settings or [], what="--set"),
            secret=secret,
        )
        objects = render_platform(spec)
    except (ValueError, FileNotFoundError) as exc:
        die(str(exc))
    if output is Format.JSON:
        sys.stdout.write(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2) + "\n")
        return
    import yaml

    header = f"# Converge platform manifests for namespace {namespace!r} (converge render platform)\n"
    sys.stdout.write(header + yaml.safe_dump_all(objects, sort_keys=False, explicit_start=True, width=120))


DASHBOARDS_HELP = """Print Converge's Grafana dashboards as JSON, or write them into a directory.

The platform overview, one deployment, the gateway, the library and governance, and the
controller and workers, built from typed Python (converge.observability.dashboards) so their queries stay in step with /metrics. Each
picks its Prometheus data source from a variable. Without --dir: one JSON object, file name to
dashboard. The files under deploy/grafana/ are this command's output:

  converge render dashboards --dir deploy/grafana
"""


@render.command("dashboards", help=DASHBOARDS_HELP)
def dashboards(
    *,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Write one <name>.json per dashboard here", file_okay=False)
    ] = None,
) -> None:
    from converge.observability.dashboards import all_dashboards
    from converge.observability.grafana import dump

    built = all_dashboards()
    if directory is None:
        sys.stdout.write(
            json.dumps({n: d.to_json() for n, d in built.items()}, indent=2, sort_keys=True) + "\n"
        )
        return
    directory.mkdir(parents=True, exist_ok=True)
    for name, dashboard in built.items():
        (directory / name).write_text(dump(dashboard))
        typer.echo(f"wrote {directory / name}", err=True)


def _pairs(values: list[str], *, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} takes KEY=VALUE, got {value!r}")
        out[key.strip()] = rest
    return out


def _replicas(values: list[str]) -> dict[Role, int]:
    out: dict[Role, int] = {}
    for name, count in _pairs(values, what="--replicas").items():
        if name not in {r.value for r in Role}:
            raise ValueError(f"--replicas: unknown role {name!r} (one of {', '.join(r.value for r in Role)})")
        if not count.strip().isdigit():
            raise ValueError(f"--replicas {name}= takes a whole number, got {count!r}")
        out[Role(name)] = int(count)
    return out
