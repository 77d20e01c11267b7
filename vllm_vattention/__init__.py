"""vAttention for vLLM: contiguous virtual KV rows over on-demand physical pages.

Entry points (pyproject.toml) live in `plugin.py`; the memory manager in `memory/` knows nothing
of vLLM.
"""

__version__ = "0.1.0"
