"""ICD inside other frameworks' training loops.

Each integration is a module of its own that imports its framework, so that importing
``icd_fast`` or this package never needs one: ``icd_fast.integrations.torchdistill``
registers ICD with torchdistill (``pip install "icd_fast[torchdistill]"``).
"""
