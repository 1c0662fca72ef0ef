"""Input drift of V2 deployments: the reference people put, and the report of the gateway's windows."""
