"""Routing as the router runs it and as an operator fits it: the prompt featurizers, the `moe`
and `cascade` policies, and the `calibrate` / `eval-router` commands with their report.

The decisions themselves are `frugalserve.cascade` (numpy and scikit-learn only); what needs
torch (the MiniLM featurizer) or the zoo (response matrices made on the fly) lives here.
"""
