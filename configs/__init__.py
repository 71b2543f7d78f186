"""The shipped experiment configs, installed as `fsp_jax.configs` (see fsp_jax.config_lib)."""
