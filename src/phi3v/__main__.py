"""`python -m phi3v` is the `phi3v` command."""

from phi3v.cli import main

main()
