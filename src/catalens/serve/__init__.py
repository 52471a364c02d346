"""catalens.serve: the HTTP server (``catalens serve MODEL``).

- :mod:`catalens.serve.app`: FastAPI app (``create_app(ServeSettings(...))``), uvicorn runner.
- :mod:`catalens.serve.batching`: asyncio micro-batcher, inference in a dedicated thread.
- :mod:`catalens.serve.protocols`: catalens JSON, TF-Serving REST, KServe v2 request/response shapes.
- :mod:`catalens.serve.connections`: uvicorn h11 protocol with head timeout, head size limit,
  connection limit.
- :mod:`catalens.serve.metrics`: Prometheus metrics (``prometheus_client``, multiprocess mode
  with ``--workers N``).
- ``static/index.html``: the web page at ``/``.

Nothing is imported here, so ``import catalens.serve.metrics`` needs no web framework
(only ``prometheus_client``).
"""
