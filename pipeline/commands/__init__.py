"""One module per command; importing them registers them on `pipeline.app.app`."""

from pipeline.commands import (  # noqa: F401
    align,
    classify,
    embed,
    evaluate,
    export,
    extract,
    index,
    search,
    select,
    serve,
    store,
    sweep,
    table,
)
