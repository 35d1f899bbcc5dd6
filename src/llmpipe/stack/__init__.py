"""The serving stack as a service (``llmpipe serve-stack up``): router, engines, control API.

Not part of any DVC stage: the deploy stage talks to a running stack over its control API
(``llmpipe.serve.live``), never imports it.
"""
