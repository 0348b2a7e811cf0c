import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.masks import is_nm_sparse, nm_mask, parse_pattern, sparsity_of, unstructured_mask


def test_row_one_to_eight_pruned_2of4_keeps_exactly_the_two_largest_per_group():
    w = torch.arange(1.0, 9.0)[None]  # [[1..8]]
    pruned = w * nm_mask(w.abs(), 2, 4)
    assert pruned.tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


def test_nm_groups_run_along_the_input_dimension():
    # Two output rows; scores decide per row, per group of 4 consecutive inputs.
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0, -8.0, 7.0, 0.5, -6.0], [1.0, -1.0, 2.0, -2.0, 0.1, 0.2, 0.3, 0.4]])
    mask = nm_mask(w.abs(), 2, 4)
    assert mask.int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1]]


def test_4of8_keeps_four_per_group_of_eight():
    w = torch.tensor([[8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0]])
    assert (w * nm_mask(w, 4, 8)).tolist() == [[8.0, 0.0, 7.0, 0.0, 6.0, 0.0, 5.0, 0.0]]


def test_unstructured_matrix_prunes_exact_count():
    w = torch.tensor([[5.0, -1.0, 3.0], [0.5, -4.0, 2.0]])
    mask = unstructured_mask(w.abs(), 0.5)
    assert mask.int().tolist() == [[1, 0, 1], [0, 1, 0]]


def test_unstructured_row_scope_prunes_each_row():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]])
    mask = unstructured_mask(w, 0.5, scope="row")
    assert mask.int().tolist() == [[0, 0, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("bad", ["3:2", "2:2", "0:4", "2-4", "a:b", ""])
def test_parse_pattern_rejects(bad):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(bad)


def test_nm_mask_rejects_indivisible_width():
    with pytest.raises(ValueError, match="multiple of M=4"):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_unstructured_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        unstructured_mask(torch.ones(2, 2), 1.5)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 6),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (5, 8)]),
    seed=st.integers(0, 10_000),
)
def test_nm_mask_invariants(rows, groups, nm, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * m, generator=g)
    mask = nm_mask(w.abs(), n, m)
    per_group = mask.reshape(rows, groups, m)
    # exactly N kept in every group of M along the input dimension
    assert (per_group.sum(-1) == n).all()
    # every kept |w| is at least every dropped |w| of the same group
    a = w.abs().reshape(rows, groups, m)
    kept_min = torch.where(per_group, a, torch.full_like(a, float("inf"))).amin(-1)
    dropped_max = torch.where(~per_group, a, torch.full_like(a, -1.0)).amax(-1)
    assert (kept_min >= dropped_max).all()
    pruned = w * mask
    assert is_nm_sparse(pruned, n, m)
    assert sparsity_of(pruned) == pytest.approx(1 - n / m)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 40), sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 1000))
def test_unstructured_mask_invariants(rows, cols, sparsity, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = unstructured_mask(w.abs(), sparsity)
    assert int((~mask).sum()) == round(sparsity * rows * cols)
    if (~mask).any() and mask.any():
        assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_is_nm_sparse_detects_violation():
    w = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    assert not is_nm_sparse(w, 2, 4)
    assert is_nm_sparse(w, 3, 4)
