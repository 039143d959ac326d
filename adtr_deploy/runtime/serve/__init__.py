"""`adtr-run --serve` and `--sink`: a live view in the browser, Prometheus metrics, health, and alert sinks.

Imported only when one of those options is used; prometheus-client and paho-mqtt (the `serve` extra) are imported lazily
by the parts that need them, and nothing here imports torch.
"""

from adtr_deploy.runtime.serve.service import TOKEN_ENV, Service

__all__ = ["Service", "TOKEN_ENV"]
