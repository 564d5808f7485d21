"""`python -m mtp_mlx` runs the mtp-mlx command line."""

from .cli import main

main()
