"""Write ``megatron_apbv/costmodel/calibration_points.json`` from the committed ``benchmarks/results``.

The cost model (``apbv plan``) calibrates on the result files that ``costmodel/profiles.yaml``
names; this copies them into the package so an installed ``apbv`` needs no repository. Run it
after committing new calibration results (``tests/test_packaging.py`` fails while the copy is stale):

    python benchmarks/package_calibration.py
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_apbv.costmodel.calibration import PACKAGED_RESULTS, Profiles, package_results  # noqa: E402


def main() -> None:
    data = package_results(Profiles.load(), ROOT / "benchmarks" / "results")
    PACKAGED_RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(json.dumps({"written": str(PACKAGED_RESULTS.relative_to(ROOT)), "files": sorted(data["files"])}))


if __name__ == "__main__":
    main()
