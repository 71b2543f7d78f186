"""fsp_jax: FSP knowledge distillation (Yim et al., CVPR 2017) in JAX/Flax.

    from fsp_jax import fsp_matrix, fsp_loss
    g = fsp_matrix(f1, f2)             # (B, H, W, m), (B, H', W', n) -> (B, m, n)
    loss = fsp_loss(teacher_features, student_features, fsp_pairs)
    feats = capture_features(model, variables, images, ("block1", "block2"))  # any model
"""
from fsp_jax.capture import capture_features, layer_paths
from fsp_jax.fsp import (default_fsp_pairs, fsp_distance, fsp_loss, fsp_matrices,
                         fsp_matrix, tokens_to_grid)
from fsp_jax.models import MODELS, Network, ResNet, create_model

__all__ = ["fsp_matrix", "fsp_matrices", "fsp_loss", "fsp_distance",
           "default_fsp_pairs", "tokens_to_grid", "capture_features", "layer_paths",
           "ResNet", "Network", "create_model", "MODELS"]
__version__ = "0.2.0"
