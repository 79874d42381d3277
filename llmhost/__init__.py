"""llmhost: host several LLMs on one machine's GPUs at once.

Memory is predicted from checkpoint headers before any weight loads; see docs/architecture.md for the map.
"""

__version__ = "0.1.0"
