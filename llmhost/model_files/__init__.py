"""Read checkpoints without loading weights: HF directories (config.json + safetensors headers) and GGUF files.

Nothing here imports torch; `open_checkpoint(path)` is the entry point.
"""

from llmhost.model_files.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from llmhost.model_files.shape import ModelShape

__all__ = ["Checkpoint", "ModelShape", "TensorInfo", "open_checkpoint"]
