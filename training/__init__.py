"""training — turns a stream of domains into LoRA adapters, using ``merge``.

Backbones (``backbones``), benchmarks (``data``), the adapter store (``store``), continual-learning
strategies (``strategies``), metrics of the accuracy matrix (``metrics``) and the DIL benchmark runner
(``bench``).
"""
