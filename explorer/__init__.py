"""The explorer web app (cli.py serve) and the static HTML report (cli.py report)."""
