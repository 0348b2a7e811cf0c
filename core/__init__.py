"""The ground floor: what every other package stands on.

Model adapters (where the blocks and linears of each family are), model loading and the
fp32 model cache, per-layer shapes of structurally pruned models, the project's exception
types, content hashing with atomic files and stage directories, and progress bars.

Nothing here imports ``calibrate``, ``passes``, ``export``, ``engines`` or ``pipeline``:
imports only go down (``tests/test_layering.py`` checks it).
"""
