"""The names of the optional probes a config (or ``gradscope.watch(probes=...)``) may ask for.

A plain list, so that checking a config imports no torch; ``gradscope.probes.OPTIONAL`` builds each
one, and a test keeps the two the same.
"""

PROBE_NAMES: tuple[str, ...] = ("memory", "update_ratio")
