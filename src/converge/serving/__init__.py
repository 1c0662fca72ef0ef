"""Entry points that model-server replicas run: `python -m converge.serving KIND ...`.

Every kind serves its model's own API plus the same three routes the process supervisor
relies on: `/health/live`, `/health/ready` and `/converge/stats` (see `common.py`).
"""
