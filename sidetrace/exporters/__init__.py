"""Exporters: where the agent sends what it collected."""
