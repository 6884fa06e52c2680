"""``python -m bundler``: the same command as the ``bundler`` console script."""

from bundler.cli import run

run()
