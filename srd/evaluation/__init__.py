"""Evaluation: what a captioner says about clean and triggered test images, and how well.

``captioning`` (stage B: caption the test split clean and triggered, write the result JSON),
``metrics`` (pycocoevalcap BLEU/METEOR/ROUGE-L/CIDEr, ASR and false-trigger rate), ``implant``
(teacher-forced target probability and sampled ASR), ``sfs`` and ``fluency`` (stage C: semantic
similarity, fluency ratio, the combined SFS), ``probe`` (linear probes of the frozen tower),
``tables`` (the results table over result files).

May import: the run kernel, :mod:`srd.data`, :mod:`srd.captioner` and :mod:`srd.attacks`.
"""
