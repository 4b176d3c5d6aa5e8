import random

from fedsim.seeding import derive_seed, numpy_rng, python_random_seeded, torch_generator


def test_derive_seed_is_stable_and_named() -> None:
    assert derive_seed(0, "sample", 1) == derive_seed(0, "sample", 1)
    assert derive_seed(0, "sample", 1) != derive_seed(0, "sample", 2)
    assert derive_seed(0, "sample", 1) != derive_seed(1, "sample", 1)
    assert derive_seed(0, "a", 12) != derive_seed(0, "a1", 2)  # names are separated
    assert 0 <= derive_seed(123, "x") < 2**63


def test_generators_follow_the_names() -> None:
    assert numpy_rng(0, "d", 3).integers(1 << 30) == numpy_rng(0, "d", 3).integers(1 << 30)
    a = torch_generator(0, "t", 1).seed  # noqa: F841 - generator constructible
    import torch

    x = torch.rand(3, generator=torch_generator(5, "t"))
    y = torch.rand(3, generator=torch_generator(5, "t"))
    assert torch.equal(x, y)


def test_python_random_seeded_restores_outer_state() -> None:
    random.seed(42)
    expected_next = random.Random(42).random()
    with python_random_seeded(7):
        inside = random.sample(range(100), 5)
    with python_random_seeded(7):
        assert random.sample(range(100), 5) == inside
    assert random.random() == expected_next  # the outer stream was not disturbed
