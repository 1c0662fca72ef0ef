"""What operators run next to Converge: Grafana dashboards built as code from typed builders
(`grafana`, `dashboards`) and the PromQL reading that keeps them in step with `/metrics`
(`promql`). The Prometheus rules they pair with live in deploy/prometheus/."""
