import os
import sys
import tempfile

# Helpers live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

# A private Inductor cache: a compiled graph cached by an earlier build of icd_fast (with
# other op schemas) must not be reused by the compile tests.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="icd_fast_inductor_"))
