"""Receivers: how apps send telemetry to the agent (OTLP over gRPC and HTTP)."""
