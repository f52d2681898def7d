"""One module per command; importing them registers them on `pipeline.app.app`."""

from pipeline.commands import align, evaluate, extract, select, store  # noqa: F401
