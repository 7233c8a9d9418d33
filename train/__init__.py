"""icd_fast's training application: teachers, distilled students, evaluation.

    python -m train demo            # digits, offline: teacher, then vanilla/KD/ICD/ICD+KD students
"""
