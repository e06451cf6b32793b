"""Plain-PyTorch definition of every mmmod computation; all backends are tested against it."""
from .coefficients import coefficients, mlb_coefficients, ogm_coefficients
from .modulate import (modulate_bucket_, modulate_sigma_bucket_, modulate_torch_rng_, noise_sigma,
                       tensor_sigma, tensor_std)
from .philox import philox_normal
from .scores import scores

__all__ = ["scores", "coefficients", "ogm_coefficients", "mlb_coefficients", "modulate_bucket_",
           "modulate_sigma_bucket_", "modulate_torch_rng_", "noise_sigma", "tensor_sigma",
           "tensor_std", "philox_normal"]
