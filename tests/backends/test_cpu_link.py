"""The AVX2 / AVX-512 translation units (csrc/cpu/vec_avx2.cpp, vec_avx512.cpp) compile with their
ISA switched on by a target pragma. An inline (COMDAT) function they define that another object
also defines would be one copy after linking, the first in link order (objects link in name
order, so csrc/module.cpp comes after them): an AVX2 copy could then run on a CPU without AVX2.
They must define none that another object of mmmod._C defines (checked on this checkout's
build objects, with nm)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NM = shutil.which("nm")


def _objects():
    return sorted(ROOT.glob("build/temp.*/csrc/**/*.o"))


def _weak(obj: Path) -> set:
    out = subprocess.run([NM, "--defined-only", str(obj)], capture_output=True, text=True,
                         check=True).stdout
    # W / V: weak (inline functions, template instances, their statics); u: unique globals
    return {parts[2] for parts in (line.split() for line in out.splitlines())
            if len(parts) == 3 and parts[1] in ("W", "V", "u") and not parts[2].startswith("DW.ref.")}


@pytest.mark.skipif(NM is None, reason="nm not found")
def test_vector_units_share_no_inline_function_with_the_baseline_objects():
    objs = _objects()
    vec = [o for o in objs if o.name in ("vec_avx2.o", "vec_avx512.o")]
    if len(vec) != 2:
        pytest.skip("no in-place build objects of the CPU extension (build/temp.*/csrc)")
    others = set()
    for o in objs:
        if o not in vec and "cuda" not in o.parts:
            others |= _weak(o)
    for v in vec:
        shared = sorted(_weak(v) & others)
        assert not shared, f"{v.name} defines inline functions other objects define too: {shared[:5]}"
