"""Threat class "work the caller does for the code" (docs/threat-model.md): caller-side work the code
controls: walking huge folders, decoding huge or exotic images.

Every test runs in bubblewrap's mount view and without it (as on a host without bwrap); in
strict mode (CI) a layer a test needs but the host lacks fails the test instead of skipping it.
"""

from __future__ import annotations

import os

import pytest
from PIL import Image

from thyme.sandbox import outputs
from thyme.sandbox.outputs import OutputRefused, load_image


class TestCallerWork:
    def test_special_files_cannot_be_made(self, sb):
        with sb.session() as s:
            r = s.run(
                "import os, stat\nfor f in (lambda: os.mkfifo('p'), lambda: os.mknod('c', 0o600 | stat.S_IFCHR, os.makedev(1, 3)), lambda: os.mknod('b', 0o600 | stat.S_IFBLK, os.makedev(7, 0))):\n    try:\n        f(); print('made')\n    except OSError as e: print(e.errno)"
            )
        assert "made" not in r.stdout, r.stdout

    @pytest.mark.parametrize("kind", ["symlinks", "folders", "empty files"])
    def test_every_entry_counts(self, sb, kind):
        make = {"symlinks": "os.symlink('x', f'e{i}')", "folders": "os.mkdir(f'e{i}')", "empty files": "open(f'e{i}', 'w').close()"}[kind]
        with sb.session() as s:
            r = s.run(f"import os\ntry:\n    for i in range(6000): {make}\nexcept OSError as e: print('stopped', e.errno)")
            assert r.error is not None and r.error.type == "DiskBudgetExceeded", (r.stdout, r.error)
            assert len(os.listdir(s.dir)) == 0
            r = s.run("import cv2, numpy as np\ncv2.imwrite('ok.png', np.zeros((30, 30), np.uint8))")
            assert r.ok and len(r.images) == 1

    def test_scan_stops_at_its_limit(self, tmp_path):
        for i in range(300):
            (tmp_path / f"l{i}").symlink_to("nowhere")
        sc = outputs.scan(str(tmp_path), max_entries=100)
        assert sc.truncated and sc.entries == 101 and sc.files == {}

    @pytest.mark.parametrize("size", [(12000, 12000), (40000, 500)])
    def test_images_over_the_pixel_budget_are_refused_undecoded(self, sb, size):
        with sb.session() as s:
            r = s.run(f"from PIL import Image\nImage.new('L', {size}).save('huge.png')\nprint('saved')")
        assert r.stdout.startswith("saved") and r.images == []
        assert r.error.type == "OutputRefused" and "pixel budget" in r.error.message and "resize" in r.error.message

    def test_pil_is_limited_to_the_accepted_formats(self, tmp_path):
        eps = tmp_path / "x.png"
        eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
        psd = tmp_path / "y.png"
        psd.write_bytes(b"8BPS\x00\x01" + b"\x00" * 40)
        for p in (eps, psd):
            with pytest.raises(OutputRefused):
                load_image(str(p))
        big = tmp_path / "big.png"
        Image.new("L", (5000, 5000)).save(big)
        with pytest.raises(OutputRefused):
            load_image(str(big), max_pixels=4096 * 4096)
        assert load_image(str(big), max_pixels=5000 * 5000).size == (5000, 5000)

    @pytest.mark.parametrize(
        "code",
        [
            "im = Image.open(image_path)\nx = 3\n" + "x = x * x\n" * 80 + "im.crop((0, 0, x, 10))\nim.crop((1, 2, 30, 40))",
            "im = Image.open(image_path)\n" + "a = (" * 3000 + "1" + ")" * 3000 + "\nim.crop((1, 2, 30, 40))",
            "im = Image.open(image_path)\ns = 'a'\n" + "s = s + s\n" * 60 + "im.crop((1, 2, 30, 40))",
            "im = Image.open(image_path)\n" + "y = 1e308 * 10\n" * 10 + "im.crop((1, 2, 30, 40))",
        ],
    )
    def test_report_arithmetic_is_bounded(self, code):
        from thyme.scoring.crops import crop_regions

        regions = crop_regions(code, (100, 100))  # returns (promptly): no unbounded number or recursion
        assert all(0 <= v <= 100 for r in regions for v in r.box)
