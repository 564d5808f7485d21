"""``mtp-mlx serve``: an OpenAI-compatible HTTP server over the continuous-batching engine.

Layout: ``protocol`` (request parsing and validation), ``responses`` (OpenAI response objects,
logprobs, per-request statistics), ``worker`` (the engine thread), ``metrics`` (Prometheus text),
``app`` (the Starlette routes), ``cli`` (the typer command). Needs ``pip install 'mtp-mlx[server]'``.
"""
