"""One module per stage kind of a build (model, onnx, kv, engine, validate, latency, decode), each a
:class:`pipeline.stages.base.Stage` with its recipe options, key, build and contribution to
results.json; :mod:`pipeline.stages.context` holds what they share. :class:`pipeline.build.Builder`
runs ``pipeline.build.STAGES`` in order."""
