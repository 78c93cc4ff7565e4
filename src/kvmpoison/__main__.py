"""``python -m kvmpoison``: the same command line as the ``kvmpoison`` script."""

from kvmpoison.cli.main import entry

entry()
