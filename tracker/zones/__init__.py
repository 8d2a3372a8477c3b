"""Zones (geofences) and the events vehicles raise at them: enter, exit, dwell, cross.

``events`` is the contract between the zone engine, which decides events each tick, and
the alerts side (``tracker.alerts``), which logs them durably and delivers them.
"""

__all__: list[str] = []
