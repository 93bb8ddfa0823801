"""PAR (Perturb and Recover) beside SRD: its loss, the CleanCLIP and fine-tune baselines, PAR's
augmentations, the CLIP zero-shot/retrieval metrics and the CLIP stages' library code.

May import: the run kernel, :mod:`srd.data`, :mod:`srd.captioner` and :mod:`srd.attacks`."""
