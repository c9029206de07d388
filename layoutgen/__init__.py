"""layoutgen: fast layout-image generation (autoencoder, latent diffusion, ControlNet) with fused GPU kernels."""

__version__ = "0.1.0"
