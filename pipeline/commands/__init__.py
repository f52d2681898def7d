"""One module per command; importing them registers them on `pipeline.app.app`."""

from pipeline.commands import align, evaluate, extract, select, store, table  # noqa: F401
