"""The gateway: three front doors over a shared core (docs/architecture.md).

- the front doors, one subpackage each: ``proxy/`` (HTTP), ``realtime/`` (WebSockets),
  ``plugin/`` (the decision service of nginx, Traefik and Envoy); none imports another;
- the shared core, the modules here (state, upstreams, environment ids, routing, actions,
  streams, decisions, headers, problems, access log, client limits): it imports no door;
- the composition, the only modules that import the doors: ``app.py`` (the public listener's
  application) and ``server.py`` (listeners and workers).
"""
