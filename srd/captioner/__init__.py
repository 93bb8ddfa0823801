"""The captioner: an OpenFlamingo model (``open_flamingo``) built, loaded, trained and decoded.

Cut by concern, as open_clip cuts its model code: ``args`` (the model flags, file names and the
signature a checkpoint records), ``vision`` (the open_clip tower and its tokens), ``lm`` (the
tokenizer and the causal LM), ``flamingo`` (the Flamingo wrapper, :class:`Captioner` and its
decoding), ``checkpoint`` (trainable parts, checkpoint layout, loading and export), ``factory``
(``build_flamingo`` / ``load_captioner``: the one way to make a captioner). Beside them:
``clip`` (the embedded tiny CLIP that becomes the frozen tower), ``tiny`` (the embedded tiny LM
and its word tokenizer), ``official`` (the published OpenFlamingo layouts, for the real-size
checks), ``features`` (the frozen tower's feature cache) and ``engine`` (the training loop every
training stage shares).

May import: the run kernel and :mod:`srd.data`.
"""
