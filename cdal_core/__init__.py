"""cdal_core: cDAL — conditional diffusion with discriminator attention — for fast MRI segmentation with uncertainty."""

__version__ = "0.1.0"
MODEL_FORMAT = "cdal-model"
MODEL_FORMAT_VERSION = 1
