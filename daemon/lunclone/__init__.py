"""lunclone: instant-restore block devices served over NBD.

The engine (everything but ``cli`` and ``client``) is standard library only,
because nbdkit embeds the distribution's ``/usr/bin/python3``.
"""

__version__ = "0.1.0"  # as pyproject.toml's (tests/test_contract.py checks)
