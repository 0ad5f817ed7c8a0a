"""Where ranks go: ``plan_ranks`` and ``visible_gpus`` on made-up machines, no GPU needed.

These are pure functions of their arguments (and of ``CUDA_VISIBLE_DEVICES``), so every
GPU layout can be checked on a CPU-only machine: a kernel that sees GPUs "4,5,6,7", a
request for ``gpus=[2, 3]``, the mistakes a user makes with ``n`` and ``gpus``.
"""

from __future__ import annotations

import dataclasses

import pytest
from helpers import local_environments

from ranks import _placement
from ranks._placement import RankSpec, plan_ranks, visible_gpus

FOUR = ["0", "1", "2", "3"]


# --- visible_gpus: CUDA_VISIBLE_DEVICES narrowed the way CUDA narrows it ------------------


@pytest.mark.parametrize(
    ("mask", "visible"),
    [
        ("0,2,3", ["0", "2", "3"]),
        ("3,1", ["3", "1"]),  # order is kept: cuda:0 is physical GPU 3
        (" 1, 2 ", ["1", "2"]),
        ("", []),
        ("-1", []),
        ("1,-1,2", ["1"]),  # CUDA stops at the first entry it cannot use
        ("0,,1", ["0"]),
        ("GPU-8a1b2c3d,MIG-4e5f", ["GPU-8a1b2c3d", "MIG-4e5f"]),  # UUIDs pass through
    ],
)
def test_visible_gpus_follows_the_mask(mask: str, visible: list[str]) -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": mask}) == visible


def test_visible_gpus_without_a_mask_counts_the_machines_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The hardware probe (NVML / nvidia-smi) stands in for a machine with three GPUs.
    monkeypatch.setattr(_placement, "_physical_gpu_count", lambda: 3)
    assert visible_gpus({}) == ["0", "1", "2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2"}) == ["2"]  # the mask wins


def test_visible_gpus_reads_the_kernels_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    assert visible_gpus() == ["5", "6"]


# --- plan_ranks: valid requests -----------------------------------------------------------


def test_cpu_ranks_when_no_gpu_is_visible() -> None:
    specs = plan_ranks(3, None, [])
    assert specs == [RankSpec(0, 3, None), RankSpec(1, 3, None), RankSpec(2, 3, None)]
    assert [s.device for s in specs] == ["cpu"] * 3
    assert [s.describe() for s in specs] == ["cpu"] * 3
    assert [s.local_rank for s in specs] == [0, 1, 2]


def test_every_visible_gpu_gets_a_rank_by_default() -> None:
    specs = plan_ranks(None, None, FOUR)
    assert [(s.rank, s.world_size, s.gpu) for s in specs] == [(r, 4, r) for r in range(4)]
    assert [s.device for s in specs] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def test_n_takes_the_first_visible_gpus() -> None:
    specs = plan_ranks(2, None, FOUR)
    assert [(s.rank, s.world_size, s.gpu) for s in specs] == [(0, 2, 0), (1, 2, 1)]


def test_gpus_puts_rank_r_on_the_rth_gpu_listed() -> None:
    specs = plan_ranks(None, [2, 3], FOUR)
    assert [(s.rank, s.world_size, s.gpu) for s in specs] == [(0, 2, 2), (1, 2, 3)]
    # Each rank sees the World's GPUs in rank order, so rank r owns cuda:r.
    assert [s.device for s in specs] == ["cuda:0", "cuda:1"]
    assert [s.describe() for s in specs] == ["cuda:0 (GPU 2)", "cuda:1 (GPU 3)"]


def test_gpus_keeps_the_order_given_and_accepts_a_tuple() -> None:
    assert [s.gpu for s in plan_ranks(None, (3, 0, 1), FOUR)] == [3, 0, 1]


def test_n_that_matches_gpus_is_accepted() -> None:
    assert [s.gpu for s in plan_ranks(2, [1, 0], FOUR)] == [1, 0]


def test_empty_gpus_asks_for_cpu_ranks_even_with_gpus_visible() -> None:
    specs = plan_ranks(2, [], FOUR)
    assert specs == [RankSpec(0, 2, None), RankSpec(1, 2, None)]


def test_rank_spec_is_frozen() -> None:
    spec = plan_ranks(1, None, [])[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rank = 5  # type: ignore[misc]


# --- plan_ranks: mistakes, refused before anything starts ---------------------------------


@pytest.mark.parametrize(
    ("n", "gpus", "visible", "error", "says"),
    [
        (None, None, [], ValueError, "n="),  # no GPU and no n: how many CPU ranks?
        (0, None, [], ValueError, "at least 1"),
        (-2, None, [], ValueError, "at least 1"),
        (True, None, [], TypeError, "int"),
        (2.0, None, [], TypeError, "int"),
        ("2", None, [], TypeError, "int"),
        (5, None, FOUR, ValueError, "gpus=[]"),  # more ranks than GPUs: say how to get CPUs
        (None, [], FOUR, ValueError, "n="),
        (None, [1, 1], FOUR, ValueError, "repeats [1]"),
        (None, [4], FOUR, ValueError, "no GPU [4]"),
        (None, [-1], FOUR, ValueError, "no GPU [-1]"),
        (None, [0], [], ValueError, "visible GPUs: none"),
        (None, [True], FOUR, TypeError, "ints"),
        (None, ["0"], FOUR, TypeError, "ints"),
        (None, "01", FOUR, TypeError, "list"),
        (None, 2, FOUR, TypeError, "list"),
        (3, [0, 1], FOUR, ValueError, "does not match"),
    ],
)
def test_plan_ranks_refuses(
    n: object, gpus: object, visible: list[str], error: type[Exception], says: str
) -> None:
    with pytest.raises(error) as raised:
        plan_ranks(n, gpus, visible)  # type: ignore[arg-type]
    assert says in str(raised.value)


# --- from placement to each rank's CUDA_VISIBLE_DEVICES ---------------------------------------


def test_each_gpu_rank_sees_the_worlds_gpus_in_rank_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kernel itself was given physical GPUs 4..7; gpus=[2, 3] means its GPUs 2 and 3.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    specs = plan_ranks(None, [3, 2], visible_gpus())
    envs = local_environments(specs, {})
    assert [envs[r]["CUDA_VISIBLE_DEVICES"] for r in (0, 1)] == ["7,6", "7,6"]
    assert [envs[r]["RANK"] for r in (0, 1)] == ["0", "1"]
    assert [envs[r]["LOCAL_RANK"] for r in (0, 1)] == ["0", "1"]


def test_cpu_ranks_see_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    envs = local_environments(plan_ranks(2, [], visible_gpus()), {})
    assert [envs[r]["CUDA_VISIBLE_DEVICES"] for r in (0, 1)] == ["", ""]
