"""Search spaces as plug-ins: the :class:`~nasforge.space.base.SearchSpace` protocol, the
registry (:func:`nasforge.space.registry.get_space`) and one module per space
(:mod:`~nasforge.space.cell_space`, :mod:`~nasforge.space.macro_space`) beside the spec, network
and latency-table blocks it builds on."""
