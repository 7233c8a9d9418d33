import os
import sys
import tempfile

import pytest

# Helpers live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

# A private Inductor cache: a compiled graph cached by an earlier build of icd_fast (with
# other op schemas) must not be reused by the compile tests.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="icd_fast_inductor_"))


@pytest.fixture
def no_md5(monkeypatch):
    import torchvision

    # The loaders check the original archives' MD5 sums, which tiny test files cannot match;
    # everything else (file layout, parsing, transforms) is the real code path.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", lambda *a, **k: True)
