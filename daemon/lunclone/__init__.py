"""lunclone: instant-restore block devices served over NBD.

The engine (everything but ``cli`` and ``client``) is standard library only,
because nbdkit embeds the distribution's ``/usr/bin/python3``.
"""
