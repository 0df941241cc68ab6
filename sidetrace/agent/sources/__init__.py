"""Agent sources: host (psutil, /proc)."""
