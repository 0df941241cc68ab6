"""Instrumentors that apps import; they never import sidetrace.agent."""
