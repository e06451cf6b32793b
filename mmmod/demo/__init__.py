"""The built-in audio-visual demo: ``mmmod demo`` / ``python -m mmmod demo``.

``data`` renders a synthetic audio-visual data set where audio is the easy modality, ``models``
holds small ResNet encoders and fusion heads with correct per-modality logits, ``train`` trains
and measures baseline / OGM-GE / OGM / MLB, ``cli`` is the command line.
"""
__all__ = ["cli", "data", "models", "train"]
