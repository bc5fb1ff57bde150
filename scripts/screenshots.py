"""Screenshots of the day-one UI journeys into ``docs/screenshots/`` (``make screenshots``).

Clicks through the same journeys as ``tests/ui/test_journeys.py`` (``tests/support/ui.py``) on
a fresh state folder with real servers, saving what a user sees at each step. The PNGs are
1280x800 with a 256-colour palette, so they stay small in the repository.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the journeys and servers the UI tests use


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args()

    from PIL import Image
    from support.ui import (
        REGION,
        VIEWPORT,
        chromium,
        journey_lineage,
        journey_materialize_region,
        journey_model,
        journey_sky_map,
        ui_world,
    )

    from gaia_flows import spark as spark_factory
    from gaia_flows.definitions import defs

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = {key.to_user_string() for key in defs.resolve_asset_graph().materializable_asset_keys}
    with tempfile.TemporaryDirectory(prefix="gaia-screenshots-") as home:
        try:
            with ui_world(Path(home)) as world, chromium() as browser:
                page = browser.new_context(viewport=VIEWPORT).new_page()
                journey_lineage(page, world, names, out)
                journey_sky_map(page, world, out)
                journey_model(page, world, out)
                run = journey_materialize_region(page, world, REGION, out)
                if run["status"] != "Success":
                    raise SystemExit(f"the run launched from the UI ended {run['status']}: {run['run_id']}")
        finally:
            spark_factory.stop_active()
    for png in sorted(out.glob("*.png")):
        with Image.open(png) as image:
            small = image.convert("RGB").quantize(256)
        small.save(png, optimize=True)
        print(f"{png.relative_to(ROOT)}: {png.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
