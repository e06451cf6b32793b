"""Real audio-visual data sets (CREMA-D, Kinetics-Sounds, AVE) and shared audio/image features.

Importing this package imports neither torchaudio nor Pillow; both are loaded on first use.
"""
from .features import LogMel, read_image, read_wav
from .loaders import AVFolderDataset, ave, cremad, kinetics_sounds, load

__all__ = ["AVFolderDataset", "LogMel", "ave", "cremad", "kinetics_sounds", "load", "read_image",
           "read_wav"]
