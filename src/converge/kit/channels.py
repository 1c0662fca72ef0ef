"""PostgreSQL NOTIFY channels: the one place their names are written, for every side of them."""

EVENTS = "converge_events"  # payload: an event id; sent at commit for every outbox event
ROUTES = "converge_routes"  # payload: a deployment id; the controller wrote its observed status
WAKE = "converge_wake"  # payload: a deployment id; the gateway asks for it to scale up from zero
# payload: `deployment:<id>`, `version:<id>`, `model:<id>` or `policy:`; sent at commit by
# triggers (migration 0012) when what a deployment's reconcile reads changes
RECONCILE = "converge_reconcile"
