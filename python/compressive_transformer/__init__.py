"""compressive_transformer: the model layer on top of ct_kernels."""
