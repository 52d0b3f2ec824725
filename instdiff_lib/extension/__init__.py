"""The extension: layouts planned by a language model (or an offline template planner), the placement check of
the generated instances by a grounding detector, and the human rating sheet.
May import ``evaluation`` (its metrics), ``datasets`` and ``layouts``."""
