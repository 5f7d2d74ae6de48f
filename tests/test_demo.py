import xarray as xr

import pcmx
from pcmx.demo import main


def test_demo_writes_valid_stores_and_figures(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--output", str(out), "--size", "192", "--beads", "25", "--states", "2"]) == 0
    assert pcmx.open_store(out / "true_operator.zarr", kind="operator").sizes["y"] == 192
    assert xr.open_zarr(out / "simulation.zarr", consolidated=False)["image"].shape == (2, 192, 192)
    assert (out / "simulation.png").stat().st_size > 10_000
    restored = pcmx.open_store(out / "restoration.zarr", kind="restoration")
    assert restored["sparse"].shape == (192, 192) and float(restored["sparse"].max()) > 0
    assert (out / "deblurring.png").stat().st_size > 10_000
    rl = xr.open_zarr(out / "restored_rl.zarr")  # the last step: written chunk by chunk
    assert rl["restored"].shape == (192, 192) and rl["x"].attrs["units"] == "micrometer"
    assert float(rl["restored"].max()) > 0
    assert "validation: valid" in capsys.readouterr().out
    assert main(["--output", str(out), "--size", "192", "--beads", "25"]) == 2  # no silent overwrite
