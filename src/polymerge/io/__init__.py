"""Checkpoint input and output: tensors are read one at a time and written atomically."""

from polymerge.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from polymerge.io.writer import AtomicOutputDir, ShardedWriter

__all__ = ["AtomicOutputDir", "Checkpoint", "ShardedWriter", "TensorInfo", "open_checkpoint"]
