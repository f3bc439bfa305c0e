"""EFA provider stand-ins (see :mod:`pyverbs.providers.efa.efadv`)."""
