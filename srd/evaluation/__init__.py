"""Evaluation: what a captioner says about clean and triggered test images, and how well.

``captioning`` (stage B: caption the test split clean and triggered, write the result JSON),
``metrics`` (pycocoevalcap BLEU/METEOR/ROUGE-L/CIDEr, ASR and false-trigger rate), ``implant``
(teacher-forced target probability and sampled ASR), ``sfs`` (stage C: semantic similarity,
fluency ratio, the combined SFS) with ``scorers`` (the models it calls) and ``fluency`` (the
n-gram and causal-LM perplexities), ``probe`` (linear probes of the frozen tower), ``tables``
(the results table over result files).

May import: the run kernel, :mod:`srd.data`, :mod:`srd.captioner` and :mod:`srd.attacks`.
"""
