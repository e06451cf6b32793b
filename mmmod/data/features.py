"""Audio and image features shared by the demo and the real-data loaders.

Log-mel spectrograms come from ``torchaudio.transforms`` when torchaudio imports; otherwise from
a pure-torch implementation (``torch.stft`` + a triangular HTK mel filterbank) that computes
the same numbers as torchaudio's defaults, with one warning. torchaudio is imported lazily,
never at package import time. WAV files are read with soundfile (torchaudio's I/O needs
torchcodec); images with Pillow when installed, else matplotlib.image (PNG only).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
import torch

_TORCHAUDIO = None  # None: not tried yet; False: unavailable; else the module
_WARNED = False


def torchaudio_transforms():
    """``torchaudio.transforms`` or ``None`` (warns once) when torchaudio cannot be imported."""
    global _TORCHAUDIO, _WARNED
    if _TORCHAUDIO is None:
        try:
            import torchaudio.transforms as T  # noqa: WPS433 (lazy on purpose)
            _TORCHAUDIO = T
        except Exception as e:  # ImportError, or an OSError from a native library
            _TORCHAUDIO = False
            if not _WARNED:
                _WARNED = True
                warnings.warn(f"torchaudio is not usable ({type(e).__name__}: {e}); mmmod computes "
                              f"log-mel spectrograms with its pure-torch fallback instead "
                              f"(install it with scripts/install_torchaudio.sh)", RuntimeWarning,
                              stacklevel=2)
    return _TORCHAUDIO or None


def _hz_to_mel(f):
    return 2595.0 * math.log10(1.0 + f / 700.0)


def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int,
                   sample_rate: int) -> torch.Tensor:
    """Triangular HTK mel filterbank [n_freqs, n_mels], as ``torchaudio.functional.melscale_fbanks``
    with its defaults (norm=None, mel_scale="htk")."""
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_pts = torch.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2)
    f_pts = 700.0 * (10 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0)


class LogMel(torch.nn.Module):
    """Waveform [..., L] -> log-mel power spectrogram in dB [..., n_mels, frames].

    ``backend="auto"`` uses torchaudio's MelSpectrogram + AmplitudeToDB when importable, else
    the pure-torch fallback (``"torch"`` forces it; ``"torchaudio"`` requires torchaudio).
    """

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, hop_length: Optional[int] = None,
                 n_mels: int = 64, f_min: float = 0.0, f_max: Optional[float] = None,
                 top_db: Optional[float] = 80.0, backend: str = "auto") -> None:
        super().__init__()
        self.sample_rate, self.n_fft = int(sample_rate), int(n_fft)
        self.hop_length = int(hop_length or n_fft // 2)
        self.n_mels, self.top_db = int(n_mels), top_db
        f_max = float(f_max if f_max is not None else sample_rate / 2)
        T = None
        if backend in ("auto", "torchaudio"):
            T = torchaudio_transforms()
            if T is None and backend == "torchaudio":
                raise ImportError("backend='torchaudio' but torchaudio cannot be imported")
        elif backend != "torch":
            raise ValueError(f"backend must be 'auto', 'torchaudio' or 'torch', got {backend!r}")
        self.backend = "torchaudio" if T is not None else "torch"
        if T is not None:
            self.mel = T.MelSpectrogram(sample_rate=self.sample_rate, n_fft=self.n_fft,
                                        hop_length=self.hop_length, f_min=f_min, f_max=f_max,
                                        n_mels=self.n_mels, power=2.0)
            self.db = T.AmplitudeToDB(stype="power", top_db=top_db)
        else:
            self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
            self.register_buffer("fb", mel_filterbank(self.n_fft // 2 + 1, f_min, f_max,
                                                      self.n_mels, self.sample_rate),
                                 persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        shape = wave.shape
        if self.backend == "torchaudio":  # [N, 1, L]: top_db per spectrogram, not per batch
            out = self.db(self.mel(wave.reshape(-1, 1, shape[-1])))
            return out.reshape(shape[:-1] + out.shape[-2:])
        x = wave.reshape(-1, shape[-1])
        spec = torch.stft(x, self.n_fft, self.hop_length, win_length=self.n_fft,
                          window=self.window.to(x.dtype), center=True, pad_mode="reflect",
                          normalized=False, onesided=True, return_complex=True).abs().pow(2)
        mel = torch.matmul(spec.transpose(-1, -2), self.fb.to(spec.dtype)).transpose(-1, -2)
        db = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
        db = db.reshape(shape[:-1] + db.shape[-2:])
        if self.top_db is not None:  # per spectrogram, as torchaudio.functional.amplitude_to_DB
            flat = db.reshape(-1, db.shape[-2] * db.shape[-1]) if db.dim() > 2 else db.reshape(1, -1)
            floor = (flat.amax(dim=-1) - self.top_db).reshape(db.shape[:-2] + (1, 1))
            db = torch.maximum(db, floor)
        return db


def log_stft(wave: torch.Tensor, n_fft: int = 512, hop_length: int = 353) -> torch.Tensor:
    """The official OGM-GE CREMA-D audio feature: log |STFT| (+1e-7), [n_fft//2+1, frames]."""
    spec = torch.stft(wave, n_fft, hop_length, win_length=n_fft, window=torch.hann_window(n_fft),
                      center=True, pad_mode="constant", return_complex=True).abs()
    return torch.log(spec + 1e-7)


def read_wav(path, sample_rate: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """Mono float32 waveform [L] (channels averaged) and its rate; resampled when asked."""
    import soundfile as sf
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if sample_rate is not None and sr != sample_rate:
        wave = resample(wave, sr, sample_rate)
        sr = sample_rate
    return wave, sr


def resample(wave: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    try:
        import torchaudio.functional as AF
        return AF.resample(wave, orig, new)
    except Exception:
        pass
    try:
        from scipy.signal import resample_poly
        g = math.gcd(orig, new)
        return torch.from_numpy(resample_poly(wave.numpy(), new // g, orig // g).astype(np.float32))
    except ImportError:
        n = max(1, round(wave.numel() * new / orig))
        return torch.nn.functional.interpolate(wave[None, None], size=n, mode="linear",
                                               align_corners=False)[0, 0]


def fit_length(wave: torch.Tensor, length: int) -> torch.Tensor:
    """Loop a short clip (as the official code tiles it) or cut a long one to ``length``."""
    if wave.numel() == 0:
        return torch.zeros(length)
    if wave.numel() < length:
        wave = wave.repeat(math.ceil(length / wave.numel()))
    return wave[:length].clamp(-1.0, 1.0)


def read_image(path, size: Optional[int] = None) -> torch.Tensor:
    """RGB image as float [3, H, W] in [0, 1], resized to ``size`` x ``size`` when given."""
    try:
        from PIL import Image
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None:
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except ImportError:
        import matplotlib.image as mpimg  # PNG without Pillow
        arr = np.asarray(mpimg.imread(str(path)), dtype=np.float32)
        if arr.max() > 1.0:
            arr = arr / 255.0
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        arr = arr[..., :3]
    img = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    if size is not None and img.shape[-2:] != (size, size):
        img = torch.nn.functional.interpolate(img[None], size=(size, size), mode="bilinear",
                                              align_corners=False)[0]
    return img


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
