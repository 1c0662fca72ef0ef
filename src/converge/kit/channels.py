"""PostgreSQL NOTIFY channels: the one place their names are written, for every side of them."""

EVENTS = "converge_events"  # payload: an event id; sent at commit for every outbox event
ROUTES = "converge_routes"  # payload: a deployment id; the controller wrote its observed status
WAKE = "converge_wake"  # payload: a deployment id; the gateway asks for it to scale up from zero
