"""Plugin mode's front door: the decision service of the proxies platforms already run —
nginx, Traefik and Envoy over HTTP (authz.py), Envoy's rate limit service over gRPC (rls.py) —
with tickets (tickets.py) for the done call that finishes a decision (done.py)."""
