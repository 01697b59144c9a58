"""In-context linear regression experiments of Dherin et al. (2025): data, models, training, the four experiments."""
