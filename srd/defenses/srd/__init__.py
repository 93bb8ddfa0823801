"""SRD (Semantic Reward Defense), stage by stage.

D1 ``pool`` (+ ``pool_source``: surrogate or data pool), D2 ``reward``, ``env``, ``agent``
(+ ``landscape``: how the reward depends on image and square), D3 ``clean`` (shards: ``shards``),
D3b/D4 ``merge``, diagnosis ``coverage``; ``inputs`` holds the flags and loaders the SRD entry
points share. The refine-tune itself is the registry's (:mod:`srd.defenses.refine`).
"""
