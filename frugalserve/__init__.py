"""frugalserve: answer each request with the cheapest model that is good enough."""

__version__ = "0.1.0"
