"""The latent plane of 2-D models: the scatter is the posterior samples of the images it is given (the
evaluation's noise, a deterministic encoder's codes) and counts those outside the square, the decoder panel
puts each image on its own code, a 2-D run writes the figure beside its record and names it there (other runs
do not), and the leaderboard composes the figures of its groups."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from benchmark.cli import run_main
from benchmark.latent_map import CODES_GID, grid_codes, latent_map_figure
from benchmark.metrics.likelihood import index_noise
from benchmark.leaderboard import write_leaderboard
from benchmark.leaderboard.tables import aggregate
from benchmark.records import read_record, write_record
from benchmark.variants import AE, VAE

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPE = (1, 8, 8)
PNG = b"\x89PNG\r\n\x1a\n"


def images(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *SHAPE), 0.3), generator=g), torch.randint(0, 10, (n,), generator=g)


def model_of(cls, latent_dim: int = 2):
    torch.manual_seed(0)
    return cls(data_shape=SHAPE, latent_dim=latent_dim, hidden=(16,)).eval()


def scatter_of(fig) -> torch.Tensor:
    points = next(c for ax in fig.axes for c in ax.collections if c.get_gid() == CODES_GID)
    return torch.as_tensor(points.get_offsets().data, dtype=torch.float32)  # (N, 2)


def reported_outside(fig) -> tuple[int, int]:
    outside, n = re.search(r"(\d+) of (\d+) outside the square", fig.axes[0].get_title()).groups()
    return int(outside), int(n)


def test_the_scatter_is_one_sample_of_q_z_x_per_image_with_the_evaluation_s_noise_and_counts_those_outside():
    model, (x, y) = model_of(VAE), images()
    n, seed, extent = 200, 3, 1.0
    fig = latent_map_figure(model, x, y, seed=seed, n_codes=n, extent=extent)
    with torch.no_grad():
        q = model.posterior(x[:n])
    expected = q.mean + q.stddev * index_noise(torch.arange(n), (2,), seed)  # the battery's codes
    z = scatter_of(fig)
    assert z.shape == (n, 2)
    torch.testing.assert_close(z, expected)
    assert not torch.allclose(z, q.mean, atol=0.05)  # a sample, not the posterior mean
    outside = int((expected.abs() > extent).any(dim=1).sum())
    assert 0 < outside < n
    assert reported_outside(fig) == (outside, n)


def test_a_deterministic_encoder_s_points_are_its_codes():
    model, (x, y) = model_of(AE), images()
    fig = latent_map_figure(model, x, y, seed=0)
    with torch.no_grad():
        codes = model.posterior(x).mean
    torch.testing.assert_close(scatter_of(fig), codes)
    assert reported_outside(fig) == (int((codes.abs() > 4.0).any(dim=1).sum()), len(x))


def test_each_decoded_tile_sits_on_its_code_in_the_square_of_the_scatter():
    model, (x, y) = model_of(VAE), images(50)
    extent, grid = 2.0, 5
    fig = latent_map_figure(model, x, y, extent=extent, grid=grid)
    left, right = fig.axes[0], fig.axes[-1]
    image = right.images[0]
    assert tuple(image.get_extent()) == (-extent, extent, -extent, extent)
    assert left.get_xlim() == right.get_xlim() == (-extent, extent)
    assert left.get_ylim() == right.get_ylim() == (-extent, extent)
    tiles = torch.as_tensor(image.get_array().data)  # (grid H, grid W, 3)
    cell = 2 * extent / grid
    with torch.no_grad():
        for (row, col), code in {(0, 0): (-extent + cell / 2, extent - cell / 2),  # top left: z2 largest
                                 (grid - 1, 2): (0.0, -extent + cell / 2)}.items():
            decoded = model.decode(torch.tensor([code])).mean[0, 0]  # (H, W)
            tile = tiles[row * 8:(row + 1) * 8, col * 8:(col + 1) * 8, 0]
            torch.testing.assert_close(tile, decoded.clamp(0, 1))
    assert grid_codes(extent, grid).shape == (grid * grid, 2)
    with pytest.raises(ValueError, match="latent_dim 2"):
        latent_map_figure(model_of(VAE, latent_dim=3), x, y)


def test_a_group_keeps_the_latent_map_of_its_smallest_seed():
    def record(seed, latent_map):
        return {"study": "s", "run": f"d-vae-s{seed}", "dataset": "d", "variant": "vae", "seed": seed,
                "status": "finished", "metrics": {"elbo": -1.0}, "latent_map": latent_map}

    (g,) = aggregate([record(1, "d-vae-s1.latent.png"), record(0, "d-vae-s0.latent.png")])
    assert g.latent_map == "d-vae-s0.latent.png"
    (g,) = aggregate([record(0, None)])
    assert g.latent_map is None


# ------------------------------------------------------------------------------------------------------------
# A tiny study: a VAE with two latent dimensions, an AE with the dataset's eight
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("latent_map")
    study = {"name": "plane", "configs": str(CONFIGS), "trainer": "cpu", "datasets": ["digits_binary"],
             "variants": ["vae", "ae"], "seeds": [0],
             "evaluation": {"iw_samples": 5, "fid_samples": 0, "max_codes": 100, "expost_epochs": 1,
                            "gmm_components": 2},
             "overrides": {"trainer.max_epochs": 1, "trainer.limit_train_batches": 3,
                           "trainer.enable_progress_bar": False},
             "variant_overrides": {"vae": {"model.init_args.latent_dim": 2}}}
    path = root / "plane.yaml"
    path.write_text(yaml.safe_dump(study))
    results = root / "results"
    code = run_main([str(path), "--results", str(results), "--work-dir", str(root / "runs"),
                           "--wandb", "disabled"])
    assert code == 0
    return results


def test_a_2d_run_writes_its_latent_map_beside_its_record_and_names_it(two_runs):
    folder = two_runs / "runs" / "plane"
    vae, ae = (read_record(folder / f"digits_binary-{v}-s0.json") for v in ("vae", "ae"))
    assert vae["status"] == ae["status"] == "finished"
    assert vae["protocol"]["latent_dim"] == 2 and ae["protocol"]["latent_dim"] == 8
    assert vae["latent_map"] == "digits_binary-vae-s0.latent.png"
    png = folder / vae["latent_map"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == PNG
    assert ae["latent_map"] is None
    assert sorted(p.name for p in folder.glob("*.latent.png")) == [vae["latent_map"]]


def test_the_leaderboard_composes_the_latent_maps_and_drops_a_stale_one(two_runs, tmp_path):
    md = write_leaderboard(two_runs)
    assert (two_runs / "latent_2d.png").read_bytes()[:8] == PNG and "](latent_2d.png)" in md.read_text()
    for name in ("vae", "ae"):  # the same records without the figure
        r = read_record(two_runs / "runs" / "plane" / f"digits_binary-{name}-s0.json")
        write_record(tmp_path / "runs" / "plane" / f"{r['run']}.json", {**r, "latent_map": None})
    (tmp_path / "latent_2d.png").write_bytes(b"stale")
    md = write_leaderboard(tmp_path)
    assert not (tmp_path / "latent_2d.png").exists() and "latent_2d.png" not in md.read_text()
