"""Backends: where a run's jobs run, behind one interface (:class:`consortium.backends.base.Backend`):
FLARE's simulator (:mod:`.sim`), POC on this machine (:mod:`.poc`, :mod:`.poc_system`, :mod:`.rejoin`),
a running consortium of provisioned kits (:mod:`.kits`, :mod:`.admin_kit`);
chosen by :func:`consortium.backends.open.open_backend`."""
