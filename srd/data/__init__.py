"""Data: the embedded benchmark and the COCO-format loaders every stage reads.

``scenes`` (the scene grammar: objects, rendering, reference captions), ``benchmark`` (writes a
seeded benchmark in COCO's Karpathy-split format), ``attributes`` (what a caption says about a
scene: attribute accuracy, colour recall, object errors), ``records`` (Karpathy JSON + caption
annotations -> image and caption records, the decoded-image cache, the data flags).

May import: the run kernel (``srd.errors``, ``srd.io``, ``srd.config``, ``srd.geometry``,
``srd.captions``) only.
"""
