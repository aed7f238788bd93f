"""One module per suite, each with ``run(ctx)`` (see ``bench.runner.Context``)."""
