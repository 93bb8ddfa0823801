"""Attacks: a registry of backdoors built from YAML configs, and the poisoned training set.

``config`` (the attack config, its YAML files in ``configs/`` and the attack flags), ``text``
(caption rewriting: the target inserted, a concept substituted), ``triggers`` (pixel triggers,
pixel-exact), ``attack`` (the built :class:`Attack`), ``registry`` (``register_kind`` and
:func:`build_attack`), ``craft`` (Shadowcast's poisons crafted against the frozen tower),
``poison`` (the seeded poison draw), ``trainset`` (the poison plan, training samples and the
images an attack's training run sees).

May import: the run kernel, :mod:`srd.data` and :mod:`srd.captioner`.
"""
