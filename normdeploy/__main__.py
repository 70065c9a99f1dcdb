"""python -m normdeploy: the command line."""
from .cli import main

main()
