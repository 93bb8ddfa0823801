"""SODA (semantic backdoor detection and mitigation) on a classifier of the benchmark's shapes.

Modules: ``shapes`` (single-object classification data), ``classifier`` (the CNN and its split
at an analysed layer), ``training`` (clean and semantic-backdoor training, evaluation),
``causality`` (causal attribution), ``detection`` (MAD outlier test, target and source),
``reverse`` (reconstruction of infected samples), ``removal`` (masked fine-tune and the
fine-tune / last-layer-retraining baselines), ``report`` (zoo tables), ``args`` (each stage's
flags) and ``stages`` (the stages the ``train/soda_*`` and ``eval/soda_*`` entry points run).

May import: the run kernel, :mod:`srd.data` and :mod:`srd.attacks`.
"""
