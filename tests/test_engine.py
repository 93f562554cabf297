"""Batching: every item once per pass, labels aligned with their images, order from the generator."""

import torch

from cxr.engine import batches_in_order, iterate_batches


def numbered(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixels hold their own index, labels equal to the index: alignment is checkable."""
    index = torch.arange(n)
    return index.view(n, 1, 1).expand(n, 2, 2).to(torch.uint8).contiguous(), index


def test_unshuffled_batches_are_the_split_in_order():
    images, labels = numbered(10)
    batches = list(iterate_batches(images, labels, 4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), labels)


def test_shuffled_batches_cover_every_item_once_with_its_own_label():
    images, labels = numbered(23)
    batches = list(iterate_batches(images, labels, 5, torch.Generator().manual_seed(0)))
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(23)) and not torch.equal(seen, labels)
    for x, y in batches:
        assert torch.equal(x[:, 0, 0].long(), y)


def test_the_generator_fixes_the_order():
    images, labels = numbered(12)
    orders = [torch.cat([y for _, y in iterate_batches(images, labels, 5, torch.Generator().manual_seed(seed))])
              for seed in (1, 1, 2)]
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])


def test_batches_follow_a_given_order_with_repeats():
    images, labels = numbered(6)
    order = torch.tensor([5, 0, 5, 2])
    batches = list(batches_in_order(images, labels, order, 3))
    assert [y.tolist() for _, y in batches] == [[5, 0, 5], [2]]
    assert torch.equal(batches[0][0][:, 0, 0].long(), torch.tensor([5, 0, 5]))
