"""`python -m supcon_tf` runs the command line."""

from supcon_tf import cli

cli.run()
