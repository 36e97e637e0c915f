"""The report component: component.py (its step and its KFP definition), README.md (inputs and outputs)."""
