"""One module per command; importing them registers them on `pipeline.app.app`."""

from pipeline.commands import store  # noqa: F401
from pipeline.commands import evaluate  # noqa: F401
from pipeline.commands import select  # noqa: F401
