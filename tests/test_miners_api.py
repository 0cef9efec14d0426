"""API hardening of the PML drop-in miners and of CrossBatchMemory.forward:
flags checked as bools, inputs checked as by fastmine.mine before anything is
normalised, PML-only options rejected with one message, and PML's
CrossBatchMemory arguments (indices_tuple, enqueue_mask) rejected by name."""
import pytest
import torch

from fastmine import CrossBatchMemory, losses, miners

ALL_MINERS = [miners.BatchEasyHardMiner, miners.BatchHardMiner, miners.DistanceWeightedMiner]


def _batch(n=6, d=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.arange(n) % 2


# --- 1. normalize_embeddings is a bool ------------------------------------------

@pytest.mark.parametrize("cls", ALL_MINERS)
@pytest.mark.parametrize("value", ["False", 0, 1, None, [True]])
def test_normalize_embeddings_must_be_a_bool(cls, value):
    with pytest.raises(TypeError, match="normalize_embeddings must be a bool"):
        cls(normalize_embeddings=value)


# --- 2. inputs checked before F.normalize ---------------------------------------

def _bad_inputs():
    x, y = _batch()
    return [
        ((x[:, 0], y), ValueError, "embeddings must be 2-D"),
        ((x.long(), y), TypeError, "embeddings must be float"),
        ((x.tolist(), y), TypeError, "embeddings must be a torch.Tensor"),
        ((x, y.tolist()), TypeError, "labels must be a torch.Tensor"),
        ((x, y, x[:, 0], y), ValueError, "ref_emb must be 2-D"),
        ((x, y, x.int(), y), TypeError, "ref_emb must be float"),
        ((x, y, x, y.tolist()), TypeError, "ref_labels must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("cls", ALL_MINERS)
@pytest.mark.parametrize("args,exc,match", _bad_inputs())
def test_miner_inputs_get_fastmines_named_errors(cls, args, exc, match):
    with pytest.raises(exc, match=match):
        cls()(*args)


# --- 3. PML-only options: one message, BatchHardMiner included -------------------

def test_pml_options_rejected_with_one_message():
    # one message for the three miners (DistanceWeightedMiner's, which the others now share);
    # BatchHardMiner used to take no **kwargs and raised a bare TypeError
    for cls, supported in [
            (miners.BatchEasyHardMiner, "pos_strategy, neg_strategy, distance, "
                                        "normalize_embeddings and backend"),
            (miners.BatchHardMiner, "distance, normalize_embeddings and backend"),
            (miners.DistanceWeightedMiner, "cutoff, nonzero_loss_cutoff, k_pos, k_neg, "
                                           "pos_strategy, distance, normalize_embeddings, seed "
                                           "and backend")]:
        with pytest.raises(ValueError) as err:
            cls(collect_stats=True, distance_kwargs=None)
        assert str(err.value) == (f"unsupported PML miner options ['collect_stats', "
                                  f"'distance_kwargs']: fastmine's {cls.__name__} supports "
                                  f"{supported}")


# --- 5. CrossBatchMemory.forward: PML's arguments -------------------------------

def _xbm():
    return CrossBatchMemory(losses.TripletMarginLoss(backend="torch"), embedding_size=3,
                            memory_size=16)


def test_xbm_rejects_indices_tuple_keyword():
    x, y = _batch()
    xbm = _xbm()
    with pytest.raises(TypeError, match="fastmine's CrossBatchMemory takes no indices_tuple: "
                                        "it mines"):
        xbm(x, y, indices_tuple=(y, y, y))
    assert xbm.filled == 0  # nothing stored


def test_xbm_rejects_enqueue_mask():
    x, y = _batch()
    xbm = _xbm()
    with pytest.raises(TypeError, match="enqueue_mask is not supported"):
        xbm(x, y, enqueue_mask=torch.ones(6, dtype=torch.bool))
    assert xbm.filled == 0


def test_xbm_rejects_other_keywords():
    x, y = _batch()
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['ref_emb'\]"):
        _xbm()(x, y, ref_emb=x)


@pytest.mark.parametrize("as_", [tuple, list])
def test_xbm_rejects_positional_indices_tuple(as_):
    x, y = _batch()
    a = torch.arange(6)
    xbm = _xbm()
    with pytest.raises(TypeError, match=f"ids .* got a {as_.__name__}: PML's indices_tuple is "
                                        "not supported"):
        xbm(x, y, as_((a, a, a)))
    assert xbm.filled == 0


def test_xbm_has_been_filled_as_pml():
    """PML's ``has_been_filled``: False until every slot holds a row, then True
    (also across wrap-around), False again after reset_queue; step by step
    against PML's own CrossBatchMemory fed the same batch sizes."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    xbm = _xbm()
    ref = pml.CrossBatchMemory(pml.TripletMarginLoss(), embedding_size=3, memory_size=16)
    seen = []
    for n in (6, 6, 3, 1, 6, 16):  # fills at the 4th step (16 rows), then wraps
        x, y = torch.randn(n, 3), torch.arange(n) % 2
        xbm(x, y)
        ref(x, y)
        assert xbm.has_been_filled == ref.has_been_filled
        seen.append(xbm.has_been_filled)
    assert seen == [False, False, False, True, True, True]
    xbm.reset_queue()
    ref.reset_queue()
    assert xbm.has_been_filled is False and ref.has_been_filled is False
