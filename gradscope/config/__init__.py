"""YAML -> validated settings; the names of rule kinds and probes a config may use live here.

``from gradscope.config import Settings, load_config, Checks, ...``: every public name of ``config.config``.
"""

from gradscope.config.config import *  # noqa: F403
