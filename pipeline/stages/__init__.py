"""One module per stage kind of a build (model, onnx, kv, engine, validate, latency, decode), each
with its recipe options, its ``key`` and its ``run``; :mod:`pipeline.stages.context` holds what
they share. :class:`pipeline.build.Builder` calls them in order."""
