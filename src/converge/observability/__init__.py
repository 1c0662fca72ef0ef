"""What operators run next to Converge: Grafana dashboards built as code from typed builders
(`grafana`, `panels`, `dashboards`), the PromQL reading that keeps them in step with `/metrics`
(`promql`), and the GPU collector (`gpu`, NVML) whose series the GPU panels and rules read. The
Prometheus rules they pair with live in deploy/prometheus/."""
