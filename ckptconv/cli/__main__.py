"""``python -m ckptconv.cli``."""

from . import main

main()
