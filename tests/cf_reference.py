"""A tiny CancerFoundation in the published on-disk format, built from torch's own modules.

Shared by the encoder tests (which check STMDiT's module against it) and the training tests
(which train with it as GE encoder).
"""

import json
import shutil

import torch
from torch import nn

TINY = {
    "n_bins": 51,
    "max_seq_len": 12,
    "nlayers": 2,
    "nheads": 4,
    "embsize": 32,
    "d_hid": 64,
    "dropout": 0.2,
}
PANEL = ["ERBB2", "ESR1", "PGR", "KRT8", "KRT18", "EPCAM", "CD3E", "PTPRC", "CD68", "COL1A1"]
PAD_ID = 1
CLS_ID = 0


class Reference(nn.Module):
    """CancerFoundation as the original builds it: torch's own modules, official layout."""

    def __init__(self, ntoken, embsize, nheads, d_hid, nlayers, dropout, **_):
        super().__init__()
        self.embedding = nn.Embedding(ntoken, embsize, padding_idx=PAD_ID)
        self.enc_norm = nn.LayerNorm(embsize)
        self.value1 = nn.Linear(1, embsize)
        self.value2 = nn.Linear(embsize, embsize)
        self.value_norm = nn.LayerNorm(embsize)
        layer = nn.TransformerEncoderLayer(embsize, nheads, d_hid, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-trivial values everywhere, norms included
            for name, p in self.named_parameters():
                noise = 0.2 * torch.randn(p.shape, generator=generator)
                p.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)
        self.eval()

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            "gene_encoder.embedding.weight": self.embedding.weight,
            "gene_encoder.enc_norm.weight": self.enc_norm.weight,
            "gene_encoder.enc_norm.bias": self.enc_norm.bias,
        }
        for ours, theirs in (("linear1", self.value1), ("linear2", self.value2), ("norm", self.value_norm)):
            state[f"value_encoder.{ours}.weight"] = theirs.weight
            state[f"value_encoder.{ours}.bias"] = theirs.bias
        state.update({f"encoder.{k}": v for k, v in self.encoder.state_dict().items()})
        return {k: v.detach().clone() for k, v in state.items()}

    @torch.no_grad()
    def forward(self, ids, values):
        values = values.clamp(max=512).unsqueeze(-1)
        x = self.enc_norm(self.embedding(ids)) + self.value_norm(self.value2(torch.relu(self.value1(values))))
        return self.encoder(x, src_key_padding_mask=ids.eq(PAD_ID))


def write_folder(folder, vocab_json, state, args=TINY):
    """A CancerFoundation folder in the published layout: args.json, vocab.json, model.pth."""
    folder.mkdir(exist_ok=True)
    shutil.copy(vocab_json, folder / "vocab.json")
    (folder / "args.json").write_text(json.dumps({**args, "trunc_by_sample": True, "n_layers_cls": 3}))
    torch.save(state, folder / "model.pth")
    return folder
