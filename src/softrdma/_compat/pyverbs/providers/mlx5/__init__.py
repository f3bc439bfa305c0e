"""mlx5 provider stand-ins (see :mod:`pyverbs.providers.mlx5.mlx5dv`)."""
