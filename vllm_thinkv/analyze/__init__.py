"""`thinkv analyze`: measure why a model's keys are compressible.

Thin keys, KVSlimmer-style key merging and inter-head reconstruction each rest
on a measurable claim about a model's keys and values. This package measures
those claims for *one* model on *one* calibration text, so that ranks are chosen
from numbers rather than from papers:

- `spectra`:    singular-value spectra and energy-based effective ranks;
- `stats`:      per-layer accumulators (Gram matrices, adjacent-token cosines);
- `predict`:    inter-head linear predictability (greedy least squares, held-out R^2);
- `logits`:     the rank at which thin q.k reproduces the attention logits;
- `run`:        the two passes over the text that tie them together;
- `report`, `plots`, `cli`: JSON, markdown summary, figures, command line.
"""
