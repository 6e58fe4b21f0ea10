"""Running bondtape in production: configuration, worker processes, operations.

- :mod:`bondtape.production.config`: settings from a TOML file and ``BONDTAPE_*``
  environment variables (``bondtape serve --config FILE``).
- :mod:`bondtape.production.worker`: one web worker process (its own Engine and Sequencer),
  metrics wired in, database outages answered with HTTP 503, graceful shutdown.
- :mod:`bondtape.production.supervisor`: several workers sharing listening sockets and one
  database; restarts a worker that dies; stops them all gracefully.
- :mod:`bondtape.production.loadkit`: a provisioned deployment and the HTTP/FIX clients that
  ``benchmarks/load.py`` and the fault tests drive it with.

See docs/deploy.md.
"""
