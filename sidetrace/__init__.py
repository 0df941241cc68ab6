"""sidetrace: an observability and tracing sidecar agent, and instrumentors for apps."""

__version__ = "0.1.0"
