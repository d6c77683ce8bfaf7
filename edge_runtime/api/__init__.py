"""The local API for applications on the device: TF Serving-shaped REST and the fast path."""

from edge_runtime.api.client import FastPathClient
from edge_runtime.api.fastpath import FastPathServer
from edge_runtime.api.rest import RestServer

__all__ = ["FastPathClient", "FastPathServer", "RestServer"]
