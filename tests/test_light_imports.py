"""Commands that only read files do not import MONAI and PyTorch (several seconds of start-up each time on a
small machine): reading a cache (``segpipe inspect CACHE``), its keys, the manifests and the metrics of
``segpipe evaluate``."""

from __future__ import annotations

import subprocess
import sys

import pytest

LIGHT = ["segpipe.data.inspect", "segpipe.data.cache", "segpipe.data.manifest", "segpipe.data.layouts",
         "segpipe.evaluation.protocols", "segpipe.inference.postprocess", "segpipe.transforms.distance", "segpipe.resources", "cli.main"]


def test_light_modules_do_not_import_monai_or_torch():
    # one interpreter for all (each takes a second to start): the first module that loads them is named
    code = ("import importlib, sys\n"
            "for m in sys.argv[1:]:\n"
            "    importlib.import_module(m)\n"
            "    heavy = sorted(h for h in ('monai', 'torch') if h in sys.modules)\n"
            "    if heavy:\n"
            "        print(m, 'loads', ', '.join(heavy)); break\n")
    out = subprocess.run([sys.executable, "-c", code, *LIGHT], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_the_chain_is_still_reachable_from_the_package():
    from segpipe.transforms import SignedDistanced, build_preprocessing
    from segpipe.transforms.preprocessing import SignedDistanced as direct

    assert SignedDistanced is direct and callable(build_preprocessing)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        import segpipe.transforms

        segpipe.transforms.nothing  # noqa: B018
