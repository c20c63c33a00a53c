import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from stmdit.encoders.expression import PanelExpressionEncoder, align_to_panel, gene_codes, log1p_cp10k


def make_adata(n=30, genes=("A", "B", "C", "D", "E"), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.uniform(0.5, 20, size=len(genes)), size=(n, len(genes))).astype(np.float32)
    return ad.AnnData(
        x, var=pd.DataFrame(index=list(genes)), obs=pd.DataFrame(index=[f"s{i}" for i in range(n)])
    )


def test_alignment_reorders_reports_missing_and_keeps_library_size():
    adata = make_adata()
    counts, library, report = align_to_panel(adata, ["C", "A", "Z"])
    np.testing.assert_array_equal(counts[:, 0], adata.X[:, 2])
    np.testing.assert_array_equal(counts[:, 1], adata.X[:, 0])
    np.testing.assert_array_equal(counts[:, 2], 0)
    np.testing.assert_allclose(library, adata.X.sum(1))  # all input genes, not just the panel's
    assert report.found == 2 and report.missing == ["Z"] and report.unused_input_genes == 3
    assert "2/3 panel genes found" in report.summary() and "Z" in report.summary()


def test_alignment_accepts_series_dict_dataframe_and_case_differences():
    series = pd.Series({"cd3e": 4.0, "PTPRC": 2.0})
    counts, _, report = align_to_panel(series, ["PTPRC", "CD3E"])
    np.testing.assert_array_equal(counts, [[2.0, 4.0]])
    assert report.case_matched == ["CD3E"]
    counts, _, _ = align_to_panel({"B": 1, "A": 3}, ["A", "B"])
    np.testing.assert_array_equal(counts, [[3, 1]])
    frame = pd.DataFrame([[1, 2], [3, 4]], columns=["X", "Y"])
    np.testing.assert_array_equal(align_to_panel(frame, ["Y"])[0], [[2], [4]])


def test_alignment_through_a_var_column_of_symbols():
    adata = make_adata(genes=("ENSG1", "ENSG2"))
    adata.var["symbol"] = ["MKI67", "TOP2A"]
    counts, _, report = align_to_panel(adata, ["TOP2A"], gene_column="symbol")
    np.testing.assert_array_equal(counts[:, 0], adata.X[:, 1])
    with pytest.raises(KeyError, match="no column 'gene_ids'"):
        align_to_panel(adata, ["TOP2A"], gene_column="gene_ids")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([[1.0, np.nan]]), r"NaN in expression \(row 0, gene 'B'\)"),
        (np.array([[1.0, -2.0]]), r"negative value -2.0 \(row 0, gene 'B'\)"),
        (np.array([["a", "b"]]), r"must be numeric"),
    ],
)
def test_alignment_rejects_values_that_cannot_be_counts(values, message):
    frame = pd.DataFrame(values, columns=["A", "B"])
    with pytest.raises(ValueError, match=message):
        align_to_panel(frame, ["A", "B"])


def test_alignment_rejects_duplicates_no_overlap_and_unnamed_arrays_of_the_wrong_width():
    frame = pd.DataFrame([[1, 2]], columns=["A", "A"])
    with pytest.raises(ValueError, match=r"duplicated gene names \['A'\]"):
        align_to_panel(frame, ["A"])
    with pytest.raises(ValueError, match="none of the 2 panel genes"):
        align_to_panel(pd.Series({"Q": 1.0}), ["A", "B"])
    with pytest.raises(ValueError, match="unnamed array must already be in panel order with 2 columns"):
        align_to_panel(np.ones((1, 3)), ["A", "B"])
    with pytest.raises(TypeError, match="expression must be AnnData"):
        align_to_panel("counts.csv", ["A"])


def test_log1p_cp10k_by_hand_and_all_zero_spots():
    counts = np.array([[1.0, 3.0], [0.0, 0.0]])
    out = log1p_cp10k(counts, counts.sum(1))
    np.testing.assert_allclose(out[0], np.log1p([2500.0, 7500.0]), rtol=1e-6)
    np.testing.assert_array_equal(out[1], [0.0, 0.0])


def test_panel_encoder_fit_standardises_and_roundtrips(tmp_path):
    adata = make_adata(n=200, genes=[f"G{i}" for i in range(12)])
    adata.X[:, 3] = 0  # an unexpressed gene is never chosen
    enc = PanelExpressionEncoder.fit(adata, n_genes=6, layer=None)
    assert len(enc.genes) == 6 and "G3" not in enc.genes
    out, report = enc.encode(adata)
    assert out["ge"].shape == (200, 6) and out["ge_tokens"].shape == (200, 6, enc.token_dim)
    assert out["ge_mask"].all() and report.coverage == 1.0
    torch.testing.assert_close(out["ge"].mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(out["ge"].std(0, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)
    enc.save_pretrained(tmp_path)
    loaded = PanelExpressionEncoder.from_pretrained(tmp_path)
    assert loaded.genes == enc.genes
    again, _ = loaded.encode(adata)
    assert torch.equal(again["ge"], out["ge"]) and torch.equal(again["ge_tokens"], out["ge_tokens"])


def test_panel_encoder_warns_about_missing_genes_and_handles_empty_spots():
    enc = PanelExpressionEncoder(genes=["A", "B", "C"])
    with pytest.warns(UserWarning, match="2/3 panel genes found"):
        out, _ = enc.encode(pd.DataFrame([[0.0, 0.0], [1.0, 5.0]], columns=["A", "B"]))
    assert torch.isfinite(out["ge"]).all()
    torch.testing.assert_close(out["ge"][0], torch.zeros(3))


def test_gene_codes_depend_only_on_the_symbol():
    a = gene_codes(["MKI67", "CD3E"], 16)
    b = gene_codes(["CD3E", "mki67"], 16)
    torch.testing.assert_close(a[0], b[1])
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))
    assert abs(float(a[0] @ a[1])) < 0.9
