"""CancerFoundation encoder: the real on-disk format (a tiny random model under the official
names, next to the real vocabulary), equivalence with a ``torch.nn.TransformerEncoder``
reference, the original's preprocessing, and the gene panel."""

import argparse
import gzip
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cf_reference import CLS_ID, PAD_ID, PANEL, TINY, Reference, write_folder
from stmdit.encoders.cancerfoundation import (
    CancerFoundationEncoder,
    choose_panel,
    map_to_vocabulary,
    quantile_bins,
    read_vocabulary,
)
from stmdit.io import UntrustedPickleError


@pytest.fixture
def vocab_json(test_data):
    return test_data / "cancerfoundation_assets" / "vocab.json"


@pytest.fixture
def reference(vocab_json):
    ntoken = len(json.loads(vocab_json.read_text()))
    return Reference(ntoken, **TINY)


@pytest.fixture
def folder(tmp_path, vocab_json, reference):
    return write_folder(tmp_path / "cf", vocab_json, reference.official_state_dict())


def load(folder, **kwargs):
    kwargs.setdefault("genes", PANEL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean official checkpoint loads without any warning
        return CancerFoundationEncoder.from_cancerfoundation(folder, **kwargs)


def spot_counts(n=5, seed=0):
    """Spots with varying numbers of expressed genes (one all-zero, one fully expressed)."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(4, size=(n, len(PANEL))).astype(np.float32)
    counts[rng.random(counts.shape) < 0.5] = 0
    counts[0] = 0
    counts[1] = rng.integers(1, 9, size=len(PANEL))
    return counts


def tiny_encoder(n_genes=6, max_seq_len=12, **config):
    return CancerFoundationEncoder(
        ntoken=40,
        n_bins=11,
        max_seq_len=max_seq_len,
        nlayers=1,
        nheads=2,
        embsize=8,
        d_hid=16,
        genes=[f"G{i}" for i in range(n_genes)],
        gene_ids=list(range(3, 3 + n_genes)),
        **config,
    )


# -- the network against torch's TransformerEncoder ------------------------------------------


def assert_matches_reference(encoder, reference, counts):
    out = encoder(torch.from_numpy(counts))
    ids, values = encoder.tokenize(counts)
    expected = reference(ids, values)
    torch.testing.assert_close(
        out["ge"], nn.functional.normalize(expected[:, 0], dim=-1), atol=1e-5, rtol=1e-5
    )
    mask = out["ge_mask"]
    torch.testing.assert_close(out["ge_tokens"][mask], expected[:, 1:][mask], atol=1e-5, rtol=1e-5)
    return out, ids, values


@pytest.mark.parametrize("include_zero_genes", [True, False])
def test_official_checkpoint_matches_a_torch_transformer_encoder(folder, reference, include_zero_genes):
    encoder = load(folder, binning_seed=0, include_zero_genes=include_zero_genes)
    assert encoder.load_report.unmatched == [] and len(encoder.load_report.loaded) == 9 + 12 * TINY["nlayers"]
    counts = spot_counts()[1:]  # every spot expresses some gene
    out, ids, values = assert_matches_reference(encoder, reference, counts)
    assert out["ge"].shape == (4, 32) and out["ge_tokens"].shape == (4, len(PANEL), 32)
    torch.testing.assert_close(out["ge"].norm(dim=1), torch.ones(4))
    assert (ids[:, 0] == CLS_ID).all() and (values[:, 0] == -2).all()
    if include_zero_genes:  # CancerFoundation's embedding: every panel gene, zeros as bin 0, no padding
        assert out["ge_mask"].all()
        assert ((values[:, 1:] == 0) == torch.from_numpy(counts == 0)).all()
    else:  # scGPT's convention: expressed genes only, then <pad> with the pad value, masked out
        n_expressed = torch.from_numpy((counts > 0).sum(1))
        assert (out["ge_mask"].sum(1) == n_expressed).all() and not out["ge_mask"].all()
        padding = ids[:, 1:] == PAD_ID
        assert (padding == ~out["ge_mask"]).all() and (values[:, 1:][padding] == -2).all()
        assert (out["ge_tokens"][~out["ge_mask"]] == 0).all()


def test_token_level_equivalence_with_padding_and_value_clamp(folder, reference):
    encoder = load(folder)
    ids = torch.tensor([[CLS_ID, 5, 17, 28000, 9], [CLS_ID, 11, 5, PAD_ID, PAD_ID]])
    values = torch.tensor([[-2.0, 1.0, 50.0, 700.0, 0.0], [-2.0, 3.0, 2000.0, -2.0, -2.0]])  # 700, 2000 clamp
    ours, theirs = encoder.encode_tokens(ids, values), reference(ids, values)
    valid = ids != PAD_ID
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=1e-5)
    clamped = encoder.encode_tokens(ids, values.clamp(max=512))
    torch.testing.assert_close(ours[valid], clamped[valid])


def test_training_checkpoint_with_nested_attention_names_and_extra_heads(
    tmp_path, vocab_json, reference, folder
):
    state = reference.official_state_dict()
    nested = {k.replace(".self_attn.", ".self_attn.self_attn."): v for k, v in state.items()}
    extras = {
        "cls_decoder._decoder.0.weight": torch.randn(32, 32),
        "mvc_decoder.gene2query.bias": torch.randn(32),
    }
    write_folder(tmp_path / "train", vocab_json, {**nested, **extras})
    with pytest.warns(
        UserWarning,
        match=r"unexpected checkpoint tensors \(not loaded\): \['cls_decoder\._decoder\.0\.weight', 'mvc_decoder",
    ):
        encoder = CancerFoundationEncoder.from_cancerfoundation(
            tmp_path / "train", genes=PANEL, binning_seed=0
        )
    report = encoder.load_report
    assert sorted(report.unexpected) == sorted(extras) and report.unmatched == report.unexpected
    assert len(report.renamed) == 4 * TINY["nlayers"]
    assert report.renamed["encoder.layers.1.self_attn.self_attn.in_proj_weight"] == (
        "encoder.layers.1.self_attn.in_proj_weight"
    )
    counts = torch.from_numpy(spot_counts())
    same = load(folder, binning_seed=0)(counts)
    for key, value in encoder(counts).items():
        torch.testing.assert_close(value, same[key])


# -- loading errors ----------------------------------------------------------------------------


def test_missing_required_weights_and_shape_mismatches_are_errors(tmp_path, vocab_json, reference):
    state = reference.official_state_dict()
    del state["encoder.layers.1.norm2.weight"]
    write_folder(tmp_path / "partial", vocab_json, state)
    with pytest.raises(
        ValueError,
        match=r"(?s)random values.*missing \(random init\): \['encoder\.layers\.1\.norm2\.weight'\]",
    ):
        CancerFoundationEncoder.from_cancerfoundation(tmp_path / "partial", genes=PANEL)

    write_folder(tmp_path / "wide", vocab_json, reference.official_state_dict(), args={**TINY, "embsize": 16})
    with pytest.raises(
        ValueError, match=r"another shape than the model's: gene_encoder\.embedding\.weight \[28725, 32\] vs"
    ):
        CancerFoundationEncoder.from_cancerfoundation(tmp_path / "wide", genes=PANEL)


@pytest.mark.parametrize("missing", ["model.pth", "args.json", "vocab.json"])
def test_missing_files_say_which_and_where_the_weights_come_from(folder, missing):
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{missing} not found.*CancerFoundation.*polybox"):
        CancerFoundationEncoder.from_cancerfoundation(folder, genes=PANEL)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder .*nowhere not found"):
        CancerFoundationEncoder.from_cancerfoundation(tmp_path / "nowhere", genes=PANEL)


def test_pickled_objects_need_trust_pickle(tmp_path, vocab_json, reference):
    state = {**reference.official_state_dict(), "args": argparse.Namespace(lr=1e-4)}
    write_folder(tmp_path / "pickled", vocab_json, state)
    with pytest.raises(
        UntrustedPickleError, match=r"runs code from the file.*trust_pickle=True.*--trust-pickle"
    ):
        CancerFoundationEncoder.from_cancerfoundation(tmp_path / "pickled", genes=PANEL)
    with pytest.warns(UserWarning, match="ignored args: not a tensor"):
        encoder = CancerFoundationEncoder.from_cancerfoundation(
            tmp_path / "pickled", genes=PANEL, trust_pickle=True
        )
    assert encoder.load_report.ignored == {"args": "not a tensor"}


# -- preprocessing (the original's binning and sequence layout) --------------------------------


def test_binning_by_each_spots_quantiles_by_hand():
    rng = np.random.default_rng(0)
    # non-zero values 1..4 with 5 bins: edges are the quantiles [1, 2, 3, 4], so value k -> bin k
    np.testing.assert_array_equal(quantile_bins(np.array([0, 3, 1, 0, 4, 2]), 5, rng), [0, 3, 1, 0, 4, 2])
    # [1, 1, 10]: edges at quantiles 0, 1/3, 2/3, 1 are [1, 1, 4, 10]; 1 ties with two edges -> bin 1 or 2
    draws = np.stack([quantile_bins(np.array([1.0, 1.0, 10.0, 0.0]), 5, rng) for _ in range(200)])
    assert set(draws[:, :2].ravel()) == {1, 2} and (draws[:, 2] == 4).all() and (draws[:, 3] == 0).all()
    # all values equal: every edge ties, so the bins spread over 1..n_bins-1
    spread = quantile_bins(np.full(500, 7.0), 11, rng)
    assert set(spread) == set(range(1, 11))
    np.testing.assert_array_equal(quantile_bins(np.zeros(4), 5, rng), 0)


def test_binning_ignores_library_size_and_log_transform():
    counts = np.random.default_rng(1).poisson(3, size=200).astype(np.float64)
    raw = quantile_bins(counts, 51, np.random.default_rng(7))
    normalised = quantile_bins(np.log1p(counts * 1e4 / counts.sum()), 51, np.random.default_rng(7))
    np.testing.assert_array_equal(raw, normalised)


def test_binning_seed_is_deterministic_and_independent_of_the_batch():
    counts = np.random.default_rng(0).poisson(1, size=(6, 6)).astype(np.float32)  # many ties
    seeded = tiny_encoder(binning_seed=3)
    ids, values = seeded.tokenize(counts)
    again = seeded.tokenize(counts[::-1].copy())
    assert torch.equal(again[1], values.flip(0)) and torch.equal(again[0], ids.flip(0))
    out_all, out_pairs = seeded(torch.from_numpy(counts)), seeded(torch.from_numpy(counts), batch_size=2)
    for key in out_all:
        torch.testing.assert_close(out_all[key], out_pairs[key])
    free = tiny_encoder()
    assert any(not torch.equal(free.tokenize(counts)[1], free.tokenize(counts)[1]) for _ in range(5))


def test_spot_longer_than_max_seq_len_keeps_cls_and_a_random_subset():
    encoder = tiny_encoder(n_genes=20, max_seq_len=8, binning_seed=0)
    counts = np.arange(1, 21, dtype=np.float32)[None].repeat(3, 0)
    counts[1] *= 2
    ids, values = encoder.tokenize(counts)
    assert ids.shape == (3, 8) and (ids[:, 0] == CLS_ID).all() and (ids[:, 1:] != PAD_ID).all()
    for row in ids[:, 1:]:
        assert len(set(row.tolist())) == 7 and set(row.tolist()) <= set(range(3, 23))
        assert (row.diff() > 0).all()  # the subset keeps panel order
    assert not torch.equal(ids[0], ids[1])  # a subset per spot
    # bins come from the whole spot, before the subset (distinct counts: no ties, so any rng agrees)
    binned = quantile_bins(counts[0], 11, np.random.default_rng(0))
    np.testing.assert_array_equal(values[0, 1:].numpy(), binned[ids[0, 1:].numpy() - 3])
    out = encoder(torch.from_numpy(counts))
    assert out["ge_tokens"].shape == (3, 7, 8) and out["ge_mask"].all()


def test_all_zero_spot_encodes_without_crashing():
    counts = np.zeros((2, 6), dtype=np.float32)
    counts[1, 2] = 5
    with_zeros = tiny_encoder(binning_seed=0)
    ids, values = with_zeros.tokenize(counts)
    assert (ids[0, 1:] == torch.arange(3, 9)).all() and (values[0, 1:] == 0).all()  # every gene, bin 0
    out = with_zeros(torch.from_numpy(counts))
    assert out["ge_mask"].all() and torch.isfinite(out["ge"]).all()

    nonzero_only = tiny_encoder(binning_seed=0, include_zero_genes=False)
    ids, values = nonzero_only.tokenize(counts)
    assert ids[0].tolist() == [CLS_ID] + [PAD_ID] * 6 and ids[1].tolist() == [CLS_ID, 5] + [PAD_ID] * 5
    out = nonzero_only(torch.from_numpy(counts))
    assert out["ge_mask"].tolist()[0] == [True] + [False] * 5  # the <cls> output stands in as the one token
    hidden = nonzero_only.encode_tokens(ids, values)
    torch.testing.assert_close(out["ge_tokens"][0, 0], hidden[0, 0])
    assert out["ge_mask"][1].sum() == 1 and torch.isfinite(out["ge"]).all()


def test_counts_are_validated():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match=r"shape \(batch, 6\)"):
        encoder(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=">= 0"):
        encoder(torch.full((1, 6), -1.0))


def test_frozen_and_on_the_modules_device():
    encoder = tiny_encoder()
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    out = encoder(torch.ones(2, 6))
    assert not out["ge"].requires_grad and out["ge"].device == encoder.device
    assert encoder.output_dim == encoder.token_dim == 8 and encoder.genes == [f"G{i}" for i in range(6)]


# -- gene panel ---------------------------------------------------------------------------------


def test_gene_mapping_by_symbol_case_and_ensembl_column(vocab_json):
    vocab = read_vocabulary(vocab_json)
    mapping = map_to_vocabulary(["ERBB2", "krt8", "NOT_A_GENE", "c9orf135"], vocab)
    # c9orf135 is ambiguous: the vocabulary has both C9orf135 and C9ORF135
    assert mapping.symbols == {"ERBB2": "ERBB2", "krt8": "KRT8"} and mapping.case_matched == ["krt8"]
    assert mapping.unmatched == ["NOT_A_GENE", "c9orf135"] and mapping.coverage == 0.5
    assert "2/4 genes in the CancerFoundation vocabulary (50.0%)" in mapping.summary()

    adata = ad.AnnData(
        np.ones((2, 3), dtype=np.float32), var=pd.DataFrame(index=["ENSG00000141736", "ENSG1", "ENSG2"])
    )
    adata.var["symbol"] = ["ERBB2", "EPCAM", "unknown"]
    assert map_to_vocabulary(adata, vocab).found == 0  # Ensembl ids are not in the vocabulary
    assert map_to_vocabulary(adata, vocab, gene_column="symbol").symbols == {
        "ERBB2": "ERBB2",
        "EPCAM": "EPCAM",
    }
    with pytest.raises(ValueError, match="duplicated gene names"):
        map_to_vocabulary(["ERBB2", "ERBB2"], vocab)


def her2st_counts(test_data, section="C2") -> ad.AnnData:
    table = pd.read_csv(test_data / "her2st" / section / "counts.tsv.gz", sep="\t", index_col=0)
    return ad.AnnData(table.to_numpy(np.float32), obs=pd.DataFrame(index=table.index.astype(str)),
                      var=pd.DataFrame(index=table.columns.astype(str)))  # fmt: skip


def test_panel_is_cancerfoundations_cell_ranger_selection_on_her2st(test_data, vocab_json):
    """As CancerFoundation's embed(): vocabulary genes only, then scanpy's cell_ranger flavour
    with n_top_genes = 1199 on the counts, the flagged genes in the data's order."""
    import scanpy as sc

    adata = her2st_counts(test_data)
    vocab = read_vocabulary(vocab_json)
    panel, mapping = choose_panel(adata, vocab, n_hvg=1199, layer=None)
    # The vocabulary genes (matched by symbol; this project also matches a unique symbol ignoring case)
    in_vocab = adata[:, [g in mapping.symbols for g in adata.var_names]].copy()
    in_vocab.var_names = [mapping.symbols[g] for g in in_vocab.var_names]
    table = sc.pp.highly_variable_genes(in_vocab, flavor="cell_ranger", n_top_genes=1199, inplace=False)
    assert panel == list(in_vocab.var_names[table["highly_variable"].to_numpy()])
    assert 1199 <= len(panel) <= 1205 and set(mapping.unmatched).isdisjoint(panel)  # ties may add a few
    # Not the variance of log1p CP10k (the former stand-in): the two selections differ.
    from stmdit.encoders.expression import select_variable_genes

    assert set(select_variable_genes(in_vocab, 1199, layer=None)) != set(panel)


@pytest.fixture(scope="module")
def her2st_sections(test_data):
    """The three her2st sections of patient C, read as legacy ST and concatenated (obs sample_id)."""
    from conftest import HER2ST_SECTIONS
    from stmdit.data.readers import read_legacy_st

    root = test_data / "her2st"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # C3 and C4 list spot positions without counts
        sections = [read_legacy_st(root / s / "counts.tsv.gz", root / s / "spots.tsv", root / s / "he.jpg", sample_id=s)
                    for s in HER2ST_SECTIONS]  # fmt: skip
    return ad.concat(sections, index_unique="-")


def test_panel_is_chosen_per_sample_as_cancerfoundations_tutorial_on_three_her2st_sections(
    her2st_sections, vocab_json, folder, tmp_path
):
    """CancerFoundation's tutorial calls embed(batch_key="sample"): scanpy's cell_ranger with the
    sample as batch on the vocabulary genes. The default panel is exactly that, and differs from
    the panel chosen without batches."""
    import scanpy as sc

    adata = her2st_sections
    assert sorted(adata.obs["sample_id"].unique()) == ["C2", "C3", "C4"]
    vocab = read_vocabulary(vocab_json)
    panel, mapping = choose_panel(adata, vocab, n_hvg=1199)
    in_vocab = adata[:, [g in mapping.symbols for g in adata.var_names]].copy()
    in_vocab.var_names = [mapping.symbols[g] for g in in_vocab.var_names]
    in_vocab.X = in_vocab.layers["counts"]
    table = sc.pp.highly_variable_genes(
        in_vocab, n_top_genes=1199, flavor="cell_ranger", batch_key="sample_id", inplace=False
    )
    assert panel == list(in_vocab.var_names[table["highly_variable"].to_numpy()]) and len(panel) == 1199
    unbatched, _ = choose_panel(adata, vocab, n_hvg=1199, batch_key=None)
    print(
        f"her2st C2-C4: {len(set(panel) - set(unbatched))} of 1199 panel genes change with the sample as batch"
    )
    assert len(set(panel) - set(unbatched)) > 50
    # The encoder records how its panel was chosen, and keeps the record through save/load.
    encoder = load(folder, genes=None, adata=adata, n_hvg=1199, binning_seed=0)
    assert encoder.genes == panel
    assert encoder.config.panel_selection["batch_key"] == "sample_id"
    assert encoder.config.panel_selection["flavor"] == "cell_ranger"
    encoder.save_pretrained(tmp_path / "saved")
    restored = CancerFoundationEncoder.from_pretrained(tmp_path / "saved")
    assert restored.config.panel_selection == encoder.config.panel_selection and restored.genes == panel
    assert load(folder).config.panel_selection is None  # a given panel
    # `stmdit encode` builds it through the factory, which chooses the panel per sample too.
    from stmdit.encoders.factory import build_ge_encoder

    assert build_ge_encoder(f"cancerfoundation:{folder}", adata, n_genes=1199).genes == panel
    single = adata[adata.obs["sample_id"] == "C2"].copy()
    del single.obs["sample_id"]
    assert load(folder, genes=None, adata=single, n_hvg=300).config.panel_selection["batch_key"] is None


def test_panel_from_training_data_maps_symbols_and_drops_genes_outside_the_vocabulary(
    test_data, folder, vocab_json
):
    adata = her2st_counts(test_data)[:, :400].copy()
    symbols = list(adata.var_names)
    adata.var_names = [f"ENSG{i:05d}" for i in range(adata.n_vars)]
    adata.var["symbol"] = symbols
    adata.var.loc["ENSG00000", "symbol"] = "NOT_A_GENE"
    adata.X[:, 0] = np.arange(adata.n_obs) * 50.0  # the most variable gene is outside the vocabulary
    panel, mapping = choose_panel(
        adata, read_vocabulary(vocab_json), n_hvg=20, gene_column="symbol", layer=None
    )
    assert len(panel) >= 20 and "NOT_A_GENE" in mapping.unmatched and "NOT_A_GENE" not in panel

    encoder = load(folder, genes=None, adata=adata, gene_column="symbol", layer=None, binning_seed=0)
    assert len(encoder.genes) >= 11 and "NOT_A_GENE" not in encoder.genes  # default n_hvg = max_seq_len - 1
    vocab = read_vocabulary(vocab_json)
    assert encoder.config.gene_ids == [vocab[g] for g in encoder.genes]
    outputs, alignment = encoder.encode(adata, gene_column="symbol")
    assert outputs["ge"].shape == (adata.n_obs, 32) and alignment.found == len(encoder.genes)
    with pytest.raises(ValueError, match="gene_column"):
        load(folder, genes=None, adata=adata)
    with pytest.raises(ValueError, match="give either"):
        load(folder, genes=None)
    tiny = ad.AnnData(np.array([[50, 1, 10, 10]] * 20 + [[1, 100, 10, 10]] * 20, dtype=np.float32),
                      var=pd.DataFrame(index=["ERBB2", "EPCAM", "KRT8", "VIM"]))  # fmt: skip
    with pytest.raises(ValueError, match="cell_ranger selection failed on the 4 vocabulary genes"):
        choose_panel(tiny, vocab, n_hvg=2, layer=None)


def test_explicit_panel_drops_genes_outside_the_vocabulary(folder):
    with pytest.warns(UserWarning, match="dropped 1 genes not in the vocabulary.*NOT_A_GENE"):
        encoder = CancerFoundationEncoder.from_cancerfoundation(folder, genes=["erbb2", "NOT_A_GENE", "VIM"])
    assert encoder.genes == ["ERBB2", "VIM"]


def test_her2st_coverage_of_the_vocabulary(test_data, vocab_json):
    with gzip.open(test_data / "her2st" / "C2" / "counts.tsv.gz", "rt") as f:
        genes = f.readline().rstrip("\n").split("\t")[1:]
    mapping = map_to_vocabulary(genes, read_vocabulary(vocab_json))
    print(
        f"her2st C2: {mapping.found} of {mapping.n_input} genes in the CancerFoundation vocabulary "
        f"({100 * mapping.coverage:.1f}%), {len(mapping.case_matched)} matched ignoring case"
    )
    assert mapping.coverage > 0.9


# -- encode and save / load ----------------------------------------------------------------


def public_config(model) -> dict:
    """The config without diffusers' bookkeeping (``_name_or_path`` and the like)."""
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


def test_encode_reorders_genes_and_round_trips_through_save_pretrained(folder, tmp_path):
    encoder = load(folder, binning_seed=0)
    counts = spot_counts()
    frame = pd.DataFrame(counts, columns=PANEL).iloc[:, ::-1].copy()  # any column order
    frame["EXTRA"] = 3.0
    outputs, alignment = encoder.encode(frame)
    assert alignment.found == len(PANEL) and alignment.unused_input_genes == 1
    direct = encoder(torch.from_numpy(counts))
    torch.testing.assert_close(outputs["ge"], direct["ge"])

    encoder.save_pretrained(tmp_path / "saved")
    restored = CancerFoundationEncoder.from_pretrained(tmp_path / "saved")
    assert public_config(restored) == public_config(encoder) and restored.genes == PANEL
    assert not restored.training
    again, _ = restored.encode(frame)
    for key, value in outputs.items():
        assert torch.equal(value, again[key])
