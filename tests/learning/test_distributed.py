"""Training across processes: the World's collectives against what one process holds, and hard EM
and the observation fit in two gloo processes against the single-process run (the oracle:
sharding must not change the answer beyond float rounding)."""

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_backpass import Backbone, GenerativeModel, RenderedObjects
from pyro_backpass.learning.distributed import World
from pyro_backpass.learning.hard_em import EMConfig, fit_hard_em
from pyro_backpass.learning.observation_fit import fit_level


def _entry(rank, size, rendezvous, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=size)  # fmt: skip
    try:
        fn(World.current(), *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args, size=2):
    """Run ``fn(world, *args)`` in ``size`` gloo processes (raises what a process raised).

    They meet through a file in a fresh folder, not a TCP port: a port found free here could be
    taken by another pytest-xdist worker before the processes bind it."""
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = Path(folder) / "rendezvous"  # must not exist yet: gloo's FileStore makes it
        mp.spawn(_entry, args=(size, str(rendezvous), fn, args), nprocs=size, join=True)


def test_a_single_process_world_is_a_no_op():
    world = World()
    x = torch.arange(6.0).reshape(3, 2)
    assert not world.distributed and world.is_main
    assert torch.equal(world.all_reduce_sum(x), x) and torch.equal(world.all_gather_rows(x), x)
    assert torch.equal(world.gather_rows(x), x) and world.sizes(3) == [3] and world.offset(3) == 0
    assert world.shard(7) == slice(0, 7)
    with pytest.raises(ValueError, match="rank 2"):
        World(rank=2, size=2)


def _collectives(world, out):
    r = world.rank
    rows = torch.full((r + 1, 2), float(r))  # rank r holds r + 1 rows of r
    assert world.sizes(r + 1) == [1, 2] and world.offset(r + 1) == r
    assert torch.equal(world.all_gather_rows(rows), torch.tensor([[0.0] * 2, [1.0] * 2, [1.0] * 2]))
    gathered = world.gather_rows(rows)
    assert (gathered is not None) == (r == 0)
    assert torch.equal(world.all_reduce_sum(torch.tensor([r + 1])), torch.tensor([3]))
    assert torch.equal(world.all_reduce_max(torch.tensor([float(r)])), torch.tensor([1.0]))
    assert torch.equal(world.broadcast(torch.tensor([r + 5])), torch.tensor([5]))
    gen = torch.Generator().manual_seed(0)
    if r == 0:
        torch.rand(3, generator=gen)  # rank 0 alone draws; the others catch up
    world.sync_generator(gen)
    torch.save(torch.rand(2, generator=gen), f"{out}/draw{r}.pt")
    bounds = [world.bounds(5, k) for k in range(world.size)]
    assert bounds == [(0, 2), (2, 5)]


def _level_data():
    g = torch.Generator().manual_seed(3)
    td = torch.relu(torch.randn(9, 4, 5, 5, generator=g))  # (O, C, h, w)
    bu = td + 0.3 * torch.randn(td.shape, generator=g)
    used = torch.rand(9, 1, 5, 5, generator=g) > 0.2
    return bu, td, used


def _collectives_and_fit_level(world, out):
    _collectives(world, out)
    bu, td, used = _level_data()
    part = world.shard(bu.shape[0])
    fit = fit_level(bu[part], td[part], used[part], scale_td=0.2, world=world)
    if world.is_main:
        torch.save(fit.__dict__, f"{out}/fit.pt")


def test_collectives_and_the_observation_fit_of_two_shards(tmp_path):
    """One spawn (the processes' start-up is most of the time): the collectives, then a level's
    observation fit over two shards against the fit of the whole."""
    _spawn(_collectives_and_fit_level, str(tmp_path))
    assert torch.equal(torch.load(tmp_path / "draw0.pt"), torch.load(tmp_path / "draw1.pt"))
    got = torch.load(tmp_path / "fit.pt")
    want = fit_level(*_level_data(), scale_td=0.2).__dict__
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert got[key] == pytest.approx(value, rel=1e-9), key


_EM = EMConfig(iterations=1, epochs=1, init_epochs=2, batch_size=4, top_init_iterations=2)


def _hard_em_shard(world, out):
    gm = GenerativeModel.load(f"{out}/start.safetensors")
    images, masks, labels = torch.load(f"{out}/objects.pt")
    part = world.shard(labels.shape[0])
    result = fit_hard_em(gm, Backbone.default(), (images[part], masks[part], labels[part]),
                         config=_EM, progress=False, world=world)  # fmt: skip
    if world.is_main:
        gm.save(f"{out}/two.safetensors")
        torch.save(result.assignment, f"{out}/assignment.pt")


@pytest.mark.slow  # ~20 s; the command's own 2-process run is in test_train.py (slow too)
def test_hard_em_in_two_processes_gives_the_single_process_parameters(tmp_path):
    bb = Backbone.default()
    imgs, masks, labels = [], [], []
    for c, cat in enumerate(bb.categories[:2]):
        for image, mask in RenderedObjects(cat, 5, seed=7):  # 10 objects: shards of 5 and 5
            imgs.append(image), masks.append(mask), labels.append(c)
    objects = torch.stack(imgs), torch.stack(masks), torch.tensor(labels)
    gm = GenerativeModel.for_backbone(bb, num_components=2)
    gm.save(tmp_path / "start.safetensors")
    torch.save(objects, tmp_path / "objects.pt")
    _spawn(_hard_em_shard, str(tmp_path))
    one = GenerativeModel.load(tmp_path / "start.safetensors")
    result = fit_hard_em(one, bb, objects, config=_EM, progress=False)
    two = GenerativeModel.load(tmp_path / "two.safetensors")
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(),
                                 strict=True):  # fmt: skip
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assignment = torch.load(tmp_path / "assignment.pt")
    for site, value in result.assignment.items():
        assert torch.equal(assignment[site], value), site
